"""One page per run, built from the JSON the command wrote and nothing else, so
``linearize report DIR`` can rebuild a page later (a run made by an older version, a page
deleted by hand) and the commands themselves hold no HTML.

Each builder takes the parsed JSON and the directory it came from and returns a ``Page``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from linearize.errors import LinearizeError
from linearize.models import EMBEDDED_NAME
from linearize.report import figures
from linearize.report.heal_pages import compress_page, distill_page
from linearize.report.html import Page, Section, Table, figure_html, fmt, write_page
from linearize.report.png import sweep_series, with_ratios

SCORE_KEYS = ("linearity", "linearity_no_residual", "cosine", "block_influence", "angular_distance")
PAPER_CURVES = ("linearity", "linearity_no_residual")  # the two curves of the paper's figures


def _versions(d: dict) -> str:
    cfg = d.get("config") or {}
    parts = [f"linearize {d.get('version', '?')}"]
    parts += [f"{lib} {cfg[lib]}" for lib in ("torch", "transformers") if cfg.get(lib)]
    return ", ".join(parts)


def _seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _model_arg(name: str) -> str:
    """How a command line names the model: nothing for the embedded default."""
    return "" if name in (EMBEDDED_NAME, "embedded") else f" {name}"


def _slug(name: str) -> str:
    tail = Path(name.rstrip("/")).name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in tail)


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
    command = f"linearize prune{_model_arg(d['model'])} --remove {k}{calib} --out {_slug(d['model'])}-pruned{k}"
    chosen = {r["layer"] for r in top}
    meta = [
        ("model", d["model"]),
        ("data", d["data"]),
        ("tokens", f"{d['tokens']:,}"),
        ("sequence length", str(d["seq_len"])),
        ("layers scored", str(n)),
        ("device / dtype", f"{cfg.get('device', '?')} / {cfg.get('dtype', '?')}"),
        ("versions", _versions(d)),
        ("elapsed", _seconds(d.get("elapsed_s"))),
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
def _disk_mb(where: Path) -> float | None:
    files = list(where.glob("*.safetensors")) + list(where.glob("*.bin"))
    return sum(f.stat().st_size for f in files) / 2**20 if files else None


def _prune_table(d: dict) -> Table:
    steps = {s["layer"]: s for s in d["steps"]}
    initial = d.get("initial") or []
    layers = [r["layer"] for r in initial] or sorted(steps)
    crit = {r["layer"]: r.get("criterion") for r in initial}
    rows, marked = [], []
    for layer in layers:
        s = steps.get(layer, {})
        order = s["step"] + 1 if s else None
        rows.append(
            [layer, crit.get(layer), order, s.get("score"), s.get("fit_error"), s.get("elapsed_s")]
        )
        marked.append(bool(s))
    cols = [
        "layer",
        f"{d['chosen_by']} (before pruning)",
        "removed (order)",
        "score when removed",
        "fit error",
        "done at (s)",
    ]
    return Table(cols, rows, marked)


def _prune_figure(d: dict) -> str:
    initial = d.get("initial") or []
    if initial:
        y = {r["layer"]: r.get("criterion") for r in initial}
        marks = [(s["layer"], y.get(s["layer"]), str(s["step"] + 1)) for s in d["steps"]]
        keys = ["criterion", *(key for key in SCORE_KEYS if key in initial[0])]
        fig = figures.layer_curves(initial, keys, ("criterion",), d["chosen_by"], marks)
        fig.data[0].name = f"{d['chosen_by']} before pruning"
    else:  # one-shot strategies that scored no per-layer curve: the removed layers alone
        marks = [
            (s["layer"], s["score"] if s["score"] is not None else 0.0, str(s["step"] + 1))
            for s in d["steps"]
        ]
        fig = figures.layer_curves([], [], (), d["chosen_by"], marks)
    return figure_html(fig)


def _quality(d: dict) -> Table | None:
    rows = []
    for label, suffix, src in (
        ("held-out", "", d.get("eval_data")),
        ("out of domain", "_ood", d.get("ood_data")),
    ):
        before, after = d.get(f"perplexity_before{suffix}"), d.get(f"perplexity_after{suffix}")
        if before is not None or after is not None:
            rows.append([f"{label} ({src})", before, after, d.get(f"ratio{suffix}")])
    return Table(["perplexity", "before", "after", "after ÷ before"], rows) if rows else None


def _size_speed(d: dict, where: Path) -> Table:
    rows = [
        [
            "parameters",
            d.get("params_before"),
            d.get("params_after"),
            d["params_after"] / d["params_before"]
            if d.get("params_before") and d.get("params_after")
            else None,
        ],
        [
            "decoder layers",
            d.get("original_layers"),
            (d.get("original_layers") or 0) - len(d["removed"]),
            None,
        ],
    ]
    disk = _disk_mb(where)
    if disk is not None:
        rows.append(["checkpoint on disk (MB)", None, round(disk, 1), None])
    bench = where / "bench.json"
    if bench.is_file():
        b = _read(bench)["rows"]
        if len(b) >= 2:
            for key, name in (
                ("prefill_tok_s", "prefill tok/s"),
                ("decode_tok_s_b1", "decode tok/s (batch 1)"),
            ):
                rows.append([name, b[0].get(key), b[-1].get(key), b[-1].get(f"{key}_ratio")])
    return Table(["", "before", "after", "after ÷ before"], rows)


def prune_page(d: dict, where: Path) -> Page:
    n, k = d["original_layers"], len(d["removed"])
    meta = [
        ("base model", d["base_model"]),
        ("strategy", d["strategy"]),
        ("replacement", d["replace"]),
        ("criterion", d["chosen_by"]),
        ("calibration", f"{d['calib']}, {d['tokens']:,} tokens × {d['seq_len']}"),
        ("removed", f"{k} of {n} layers: {fmt(d['removed'])}"),
        ("calibration passes", fmt(d.get("calibration_passes"))),
        ("versions", _versions(d)),
        ("elapsed", _seconds(d.get("elapsed_s"))),
    ]
    exportable = d["replace"] in ("none", "fold")
    commands = [
        f"python -c \"import linearize; model, tok = linearize.load('{where.name}')\"",
        f"linearize eval {where.name} --out {where.name}-eval",
    ]
    commands.append(
        f"linearize export {where.name} --gguf {where.name}.gguf"
        if exportable
        else f"linearize prune{_model_arg(d['base_model'])} --remove {k} --replace fold "
        f"--out {where.name}-fold   # a stock checkpoint that export takes"
    )
    quality = _quality(d)
    sections = [
        Section(
            "Removed layers",
            figure=_prune_figure(d),
            text=[
                f"Crosses mark the {k} removed layers, numbered in removal order, on the "
                f"{d['chosen_by']} curve measured before the first cut."
            ],
        ),
        Section(
            "Quality",
            table=quality,
            text=[] if quality else ["No held-out perplexity was measured (--eval '')."],
        ),
        Section(
            "Per layer",
            table=_prune_table(d),
            text=["Removed rows are highlighted; sort by 'removed (order)' to replay the run."],
        ),
        Section(
            "Size and speed",
            table=_size_speed(d, where),
            text=[
                "Speed appears once `linearize bench ORIGINAL THIS --out THIS` has run: it "
                "writes bench.json beside the checkpoint and refreshes this page."
            ],
        ),
        Section("Use it", commands=commands),
    ]
    return Page(
        title=f"{d['base_model']} pruned by {k} of {n} layers",
        source="prune.json",
        meta=meta,
        sections=sections,
    )


# -- sweep ----------------------------------------------------------------------------------------
def _sweep_table(rows: list[dict]) -> Table:
    cols = [
        "strategy",
        "replace",
        "k",
        "perplexity",
        "÷ original",
        "perplexity (OOD)",
        "÷ original (OOD)",
        "removed",
        "time (s)",
        "note",
    ]
    cells = [
        [
            r["strategy"],
            r["replace"],
            r["k"],
            r.get("perplexity"),
            r["ratio"],
            r.get("perplexity_ood"),
            r["ratio_ood"],
            fmt(r["removed"]),
            r.get("elapsed_s"),
            r.get("note", ""),
        ]
        for r in with_ratios(rows)
    ]
    return Table(cols, cells)


def sweep_page(d: dict, where: Path) -> Page:
    s, rows, cfg = d["settings"], d["rows"], d["settings"]["config"]
    meta = [
        ("model", s["model"]),
        ("strategies", cfg["strategy"]),
        ("replacements", cfg["replace"]),
        ("layers removed", fmt(s["ks"])),
        ("held-out text", f"{s['eval_data']}, {s['eval_tokens']:,} tokens"),
        ("out-of-domain text", str(s.get("ood_data") or "none")),
        ("calibration", f"{cfg['calib']}, {cfg['tokens']:,} tokens"),
        ("versions", _versions(d)),
    ]
    sections = []
    for title, key in (
        ("Held-out perplexity", "perplexity"),
        ("Out-of-domain perplexity", "perplexity_ood"),
    ):
        series = sweep_series(rows, key)
        if series:
            fig = figures.curves(series, "layers removed", "perplexity (log scale)", logy=True)
            sections.append(Section(title, figure=figure_html(fig)))
    sections.append(Section("Every cell", table=_sweep_table(rows)))
    return Page(f"Pruning sweep: {s['model']}", "sweep.json", meta, sections)


# -- dynamics -------------------------------------------------------------------------------------
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
    meta = [("model", d["model"]), ("dtype", cfg.get("dtype", "?")), ("versions", _versions(d))]
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
        meta=[("models", ", ".join(r["label"] for r in rows)), ("versions", _versions(d))],
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
        ("versions", _versions(d)),
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


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LinearizeError(f"cannot read '{path}': {type(e).__name__}") from None
    if not isinstance(d, dict):
        raise LinearizeError(f"'{path}' is not a linearize output (not a JSON object)")
    return d


def render(json_path: str | Path) -> Path:
    """Write the page for one output JSON next to it; returns the page's path."""
    path = Path(json_path)
    if path.name not in PAGES:
        raise LinearizeError(f"no page for '{path.name}' (one of {', '.join(PAGES)})")
    html_name, build = PAGES[path.name]
    d = _read(path)
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
