"""The pages of ``linearize prune`` (prune.json) and of its ``--sweep`` (sweep.json)."""

from __future__ import annotations

from pathlib import Path

from linearize.report import figures
from linearize.report.html import Page, Section, Table, figure_html, fmt
from linearize.report.labels import SCORE_KEYS, model_arg, read_json, seconds, versions
from linearize.report.png import sweep_series, with_ratios


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
        b = read_json(bench)["rows"]
        if len(b) >= 2:
            for key, name in (
                ("prefill_tok_s", "prefill tok/s"),
                ("decode_tok_s_b1", "decode tok/s (batch 1)"),
            ):
                rows.append([name, b[0].get(key), b[-1].get(key), b[-1].get(f"{key}_ratio")])
    return Table(["", "before", "after", "after ÷ before"], rows)


def _search_section(search: dict) -> Section:
    """The search strategy's trace (best KL against candidates scored) and its seeds."""
    trace = search["trace"]
    x = [t["evaluations"] for t in trace]
    y = [max(t["kl"], 1e-12) for t in trace]  # a log axis: an exact 0 drawn at 1e-12
    fig = figures.curves(
        {"best so far": (x, y)}, "candidates scored", "KL to the original (per token)", logy=True
    )
    best = search["best"]
    rows = [["search (the result)", fmt(best["removed"]), best["kl"], best["kl_held_out"]]]
    rows += [
        [name, fmt(v["removed"]), v["kl"], v["kl_held_out"]]
        for name, v in sorted(search["seeds"].items(), key=lambda kv: kv[1]["kl"])
    ]
    table = Table(
        ["seed", "removed", "KL (search tokens)", "KL (held-out tokens)"],
        rows,
        [True] + [False] * (len(rows) - 1),
    )
    return Section(
        "Search",
        figure=figure_html(fig),
        table=table,
        text=[
            f"{search['evaluations']} candidates scored in {seconds(search.get('elapsed_s'))}, "
            "each by its KL from the original with its replacements in place. The held-out "
            "tokens were never searched on: a result far better on search tokens than held-out "
            "ones has overfitted them."
        ],
    )


def prune_page(d: dict, where: Path) -> Page:
    n, k = d["original_layers"], len(d["removed"])
    meta = [
        ("base model", d["base_model"]),
        ("strategy", d["strategy"] + (f" ({ref})" if (ref := d.get("strategy_reference")) else "")),
        ("replacement", d["replace"]),
        ("criterion", d["chosen_by"]),
        ("calibration", f"{d['calib']}, {d['tokens']:,} tokens × {d['seq_len']}"),
        ("removed", f"{k} of {n} layers: {fmt(d['removed'])}"),
        ("calibration passes", fmt(d.get("calibration_passes"))),
        ("versions", versions(d)),
        ("elapsed", seconds(d.get("elapsed_s"))),
    ]
    exportable = d["replace"] in ("none", "fold")
    commands = [
        f"python -c \"import linearize; model, tok = linearize.load('{where.name}')\"",
        f"linearize eval {where.name} --out {where.name}-eval",
    ]
    commands.append(
        f"linearize export {where.name} --gguf {where.name}.gguf"
        if exportable
        else f"linearize prune{model_arg(d['base_model'])} --remove {k} --replace fold "
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
        *([_search_section(d["search"])] if d.get("search") else []),
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
        ("versions", versions(d)),
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
