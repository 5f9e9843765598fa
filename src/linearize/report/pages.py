"""One page per run, built from the JSON the command wrote and nothing else, so
``linearize report DIR`` can rebuild a page later (a run made by an older version, a page
deleted by hand) and the commands themselves hold no HTML.

Each builder takes the parsed JSON and the directory it came from and returns a ``Page``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from linearize.errors import LinearizeError
from linearize.report import figures
from linearize.report.heal_pages import compress_page, distill_page
from linearize.report.html import Page, Section, Table, figure_html, write_page
from linearize.report.labels import model_arg, read_json, seconds, slug, versions
from linearize.report.prune_pages import prune_page, sweep_page

PAPER_CURVES = ("linearity", "linearity_no_residual")  # the two curves of the paper's figures


# -- analyze --------------------------------------------------------------------------------------
def most_linear(rows: list[dict], k: int) -> list[dict]:
    """The ``k`` rows the default pruning would look at first: highest linearity."""
    return sorted(rows, key=lambda r: r["linearity"], reverse=True)[:k]


def analyze_page(d: dict, where: Path) -> Page:
    rows = d["layers"]
    cfg = d.get("config") or {}
    n = len(rows)
    k = max(1, min(n - 1, round(n / 4)))
    top = most_linear(rows, k)
    keys = [key for key in rows[0] if key != "layer"]
    calib = "" if d["data"] in ("builtin", "builtin:calib") else f" --calib '{d['data']}+self'"
    command = f"linearize prune{model_arg(d['model'])} --remove {k}{calib} --out {slug(d['model'])}-pruned{k}"
    chosen = {r["layer"] for r in top}
    meta = [
        ("model", d["model"]),
        ("data", d["data"]),
        ("tokens", f"{d['tokens']:,}"),
        ("sequence length", str(d["seq_len"])),
        ("layers scored", str(n)),
        ("device / dtype", f"{cfg.get('device', '?')} / {cfg.get('dtype', '?')}"),
        ("versions", versions(d)),
        ("elapsed", seconds(d.get("elapsed_s"))),
    ]
    return Page(
        title=f"Linearity of {d['model']}",
        subtitle="How close each decoder layer is to a linear map of its input "
        "(Razzhigaev et al., 2024): 1 is perfectly linear.",
        source="linearity.json",
        meta=meta,
        sections=[
            Section(
                "Per-layer scores",
                figure=figure_html(figures.layer_curves(rows, keys, PAPER_CURVES)),
                text=[
                    "The paper's two curves are drawn; click a name in the legend to show "
                    "cosine similarity, block influence or angular distance."
                ],
            ),
            Section(
                "Most linear layers",
                items=[f"layer {r['layer']}: linearity {r['linearity']:.5f}" for r in top],
                text=[
                    "The default pruning removes the most linear layer, replaces it with its "
                    "least-squares linear map, re-scores the layers after it and repeats. "
                    f"By this analysis alone its first {k} candidates are:"
                ],
                commands=[command],
            ),
            Section(
                "Per-layer table",
                table=Table(
                    ["layer", *keys],
                    [[r["layer"], *(r[c] for c in keys)] for r in rows],
                    [r["layer"] in chosen for r in rows],
                ),
                text=["Click a column to sort; highlighted rows are the candidates above."],
            ),
        ],
    )


# -- prune ----------------------------------------------------------------------------------------
def dynamics_page(d: dict, where: Path) -> Page:
    s, rows = d["settings"], d["rows"]
    base = rows[0]
    table = [
        [
            r["checkpoint"],
            r["step"],
            r["mean_linearity"],
            r["mean_linearity"] - base["mean_linearity"],
            r["mean_linearity_no_residual"],
            r["mean_linearity_no_residual"] - base["mean_linearity_no_residual"],
        ]
        for r in rows
    ]
    meta = [
        ("checkpoints", str(len(rows))),
        ("data", s["data"]),
        ("tokens", f"{s['tokens']:,}"),
        ("sequence length", str(s["seq_len"])),
        ("dtype", s.get("dtype", "?")),
    ]
    return Page(
        title="Linearity dynamics",
        source="dynamics.json",
        meta=meta,
        sections=[
            Section(
                "Mean linearity against step", figure=figure_html(figures.dynamics_means(rows))
            ),
            Section(
                "Per layer, without residual", figure=figure_html(figures.dynamics_layers(rows))
            ),
            Section(
                "Checkpoints",
                table=Table(
                    [
                        "checkpoint",
                        "step",
                        "mean linearity",
                        "Δ first",
                        "mean w/o residual",
                        "Δ first",
                    ],
                    table,
                ),
            ),
        ],
    )


# -- eval -----------------------------------------------------------------------------------------
def _probe_section(probe: dict) -> Section:
    tasks = sorted(probe)
    layers = sorted({r["layer"] for t in tasks for r in probe[t]})
    pooling = (("accuracy", "mean"), ("accuracy_last", "last token"))
    cols = [f"{t} ({name})" for t in tasks for _, name in pooling]
    by_layer = {t: {r["layer"]: r for r in probe[t]} for t in tasks}
    rows = [
        {"layer": layer}
        | {
            f"{t} ({name})": by_layer[t].get(layer, {}).get(key)
            for t in tasks
            for key, name in pooling
        }
        for layer in layers
    ]
    fig = figures.layer_curves(rows, cols, cols, "probe accuracy")
    chance = ", ".join(f"{t} {probe[t][0].get('majority', float('nan')):.3f}" for t in tasks)
    return Section(
        "Linear probing",
        figure=figure_html(fig),
        table=Table.from_dicts(rows),
        text=[
            "Accuracy of a logistic-regression probe on each layer's hidden states, mean-pooled "
            f"over the text or at its last token (layer 0: the embeddings). Majority class: {chance}."
        ],
    )


def eval_page(d: dict, where: Path) -> Page:
    cfg = d.get("config") or {}
    meta = [("model", d["model"]), ("dtype", cfg.get("dtype", "?")), ("versions", versions(d))]
    sections = []
    if isinstance(d.get("perplexity"), (int, float)):
        p = d.get("perplexity_protocol") or {}
        sections.append(
            Section(
                "Perplexity",
                table=Table(
                    ["source", "tokens", "window", "stride", "perplexity"],
                    [
                        [
                            p.get("source"),
                            p.get("tokens"),
                            p.get("seq_len"),
                            p.get("stride"),
                            d["perplexity"],
                        ]
                    ],
                ),
            )
        )
    if d.get("lm_eval"):
        rows = [
            [task, metric, v]
            for task, ms in sorted(d["lm_eval"].items())
            for metric, v in ms.items()
        ]
        sections.append(
            Section("lm-evaluation-harness", table=Table(["task", "metric", "value"], rows))
        )
    if d.get("probe"):
        sections.append(_probe_section(d["probe"]))
    if d.get("judge"):
        j = d["judge"]
        stories = Table.from_dicts(j["stories"])
        sections.append(
            Section(
                f"LLM judge ({j['n']} stories)",
                table=stories,
                text=["Means: " + ", ".join(f"{k} {v:.2f}" for k, v in j["mean"].items())],
            )
        )
    if d.get("speed"):
        sp = d["speed"]
        keys = [k for k in sp if not k.endswith(("_min", "_max")) and k not in ("model", "path")]
        rows = [[k, sp[k], sp.get(f"{k}_min"), sp.get(f"{k}_max")] for k in keys]
        sections.append(
            Section("Speed and size", table=Table(["measure", "median", "min", "max"], rows))
        )
    if not sections:
        sections.append(
            Section("No results yet", text=["This results.json holds no finished part."])
        )
    return Page(
        title=f"Evaluation of {d['model']}", source="results.json", meta=meta, sections=sections
    )


# -- compare and bench ----------------------------------------------------------------------------
def compare_page(d: dict, where: Path) -> Page:
    rows, cols = d["rows"], d["columns"]
    return Page(
        title="Comparison",
        source="compare.json",
        meta=[("models", ", ".join(r["label"] for r in rows)), ("versions", versions(d))],
        sections=[
            Section(
                "Metrics", figure=figure_html(figures.compare(rows, cols[2:], d.get("probes", {})))
            ),
            Section("Table", table=Table.from_dicts(rows, cols)),
        ],
    )


_BENCH_COLS = {
    "model": "model",
    "layers": "layers",
    "params_m": "params (M)",
    "prefill_tok_s": "prefill tok/s",
    "prefill_tok_s_ratio": "×",
    "decode_tok_s_b1": "decode tok/s (b=1)",
    "decode_tok_s_b1_ratio": "× ",
    "decode_tok_s_batch": "decode tok/s (batch)",
    "decode_tok_s_batch_ratio": "×  ",
    "ttft_ms": "first token (ms)",
    "peak_mem_mb": "peak extra memory (MB)",
    "disk_mb": "disk (MB)",
}


def bench_page(d: dict, where: Path) -> Page:
    c = d["config"]
    meta = [
        ("device", f"{d['device']}, {d.get('threads', '?')} threads"),
        ("torch", d.get("torch", "?")),
        ("prefill", f"{c['batch_size']} × {c['seq_len']} tokens"),
        ("decode", f"{c['new_tokens']} new tokens after {c['prompt_len']}"),
        ("repeats", f"{c['repeats']}, interleaved; medians shown"),
        ("versions", versions(d)),
    ]
    return Page(
        title="Speed and size",
        source="bench.json",
        meta=meta,
        sections=[
            Section(
                "Throughput relative to the first model",
                figure=figure_html(figures.bench(d["rows"])),
            ),
            Section("Table", table=Table.from_dicts(d["rows"], list(_BENCH_COLS), _BENCH_COLS)),
        ],
    )


# -- entry points ---------------------------------------------------------------------------------
Builder = Callable[[dict, Path], Page]
PAGES: dict[str, tuple[str, Builder]] = {
    "linearity.json": ("report.html", analyze_page),
    "prune.json": ("report.html", prune_page),
    "sweep.json": ("sweep.html", sweep_page),
    "dynamics.json": ("dynamics.html", dynamics_page),
    "results.json": ("report.html", eval_page),
    "compare.json": ("compare.html", compare_page),
    "bench.json": ("bench.html", bench_page),
    "distill.json": ("report.html", distill_page),
    "compress.json": ("compress.html", compress_page),
}


def render(json_path: str | Path) -> Path:
    """Write the page for one output JSON next to it; returns the page's path."""
    path = Path(json_path)
    if path.name not in PAGES:
        raise LinearizeError(f"no page for '{path.name}' (one of {', '.join(PAGES)})")
    html_name, build = PAGES[path.name]
    d = read_json(path)
    try:
        page = build(d, path.parent)
    except (KeyError, IndexError, TypeError, ZeroDivisionError) as e:
        raise LinearizeError(
            f"'{path}' is not a complete linearize {path.stem} file ({type(e).__name__}: {e})"
        ) from None
    return write_page(page, path.parent / html_name)


def sources(out: str | Path) -> list[Path]:
    """The output JSONs in ``out``, or else in its immediate subdirectories (``eval`` writes one
    directory per model)."""
    out = Path(out)
    if not out.is_dir():
        raise LinearizeError(f"'{out}' is not a directory")
    found = [out / n for n in PAGES if (out / n).is_file()]
    if not found:
        found = [
            sub / n
            for sub in sorted(p for p in out.iterdir() if p.is_dir())
            for n in PAGES
            if (sub / n).is_file()
        ]
    if not found:
        raise LinearizeError(f"no linearize output in '{out}' (looked for {', '.join(PAGES)})")
    return found


def render_dir(out: str | Path) -> list[Path]:
    """Rebuild every page ``out`` holds the JSON for; returns the pages written."""
    return [render(p) for p in sources(out)]
