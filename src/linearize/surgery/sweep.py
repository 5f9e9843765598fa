"""Pruning sweeps: every strategy × replacement × number of removed layers, on one protocol.

The model is loaded once; each cell prunes a fresh copy of it. Greedy strategies are run once
up to the largest k, and held-out perplexity is taken as the loop passes each k of the sweep,
which is what the same run stopped at that k would give. Perplexity follows
``linearize.eval.perplexity.perplexity`` on a source disjoint from the calibration data.

``sweep.json`` is rewritten (atomically) after every cell, with ``sweep.csv``, ``sweep.md``,
``sweep.png`` and ``sweep.html``. A rerun with the same settings skips the cells already done,
so an interrupted sweep resumes.
"""

from __future__ import annotations

import copy
import csv
import io
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from linearize import arch, data, models
from linearize._io import claim_output, previous_rows, releases_output, write_json, write_text
from linearize._version import __version__
from linearize.errors import LinearizeError
from linearize.eval.perplexity import held_out_perplexities
from linearize.report import png, render
from linearize.surgery.prune import (
    REPLACEMENTS,
    Progress,
    PruneConfig,
    no_progress,
    prune_model_,
    replacements,
    strategies,
)

COLUMNS = (
    "strategy",
    "replace",
    "k",
    "perplexity",
    "ratio",
    "perplexity_ood",
    "ratio_ood",
    "removed",
    "elapsed_s",
    "forward_passes",
    "note",
)


def parse_list(text: str, choices: tuple[str, ...], what: str) -> list[str]:
    """'all' or 'a,b' → a checked list."""
    if text.strip() == "all":
        return list(choices)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in choices]
    if bad or not items:
        raise LinearizeError(f"unknown {what} {bad or text!r} (choose from {', '.join(choices)})")
    return items


def parse_ks(text: str, n_layers: int) -> list[int]:
    try:
        ks = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise LinearizeError(f"--sweep takes comma-separated counts, got '{text}'") from None
    if not ks or ks[0] < 0 or ks[-1] >= n_layers:
        raise LinearizeError(f"--sweep counts must be in 0..{n_layers - 1}, got '{text}'")
    return ks


@releases_output
def sweep(
    model: str | None,
    base: PruneConfig,
    ks: str | list[int],
    strategies: str | list[str] = "all",
    replacements: str | list[str] = "none,linear,fold",
    eval_data: str = "builtin:eval",
    eval_tokens: int = 16384,
    out: str | Path = "linearize-out/sweep",
    dtype: str = "auto",
    device: str = "auto",
    on_row: Callable[[dict], None] | None = None,
    ood_data: str | None = "default",
    on_progress: Progress = no_progress,
) -> list[dict]:
    """Run the sweep and write its table and plot into ``out``; returns the rows
    (``on_progress`` as for ``prune_model_``, each phase named with its cell).

    Every row has two perplexities: ``eval_data`` (in-domain for the built-in calibration
    text) and ``ood_data``, English of another kind ("default": ``data.default_ood()``), so
    that a method that only fits its calibration domain shows it."""
    out = Path(out)
    claim_output(out, model=model)
    hf_config = models.load_config(model)
    strategies, replacements, ks = _grid(hf_config, base, strategies, replacements, ks)
    data.calib_parts(base.calib)
    ood_data = data.eval_sources(eval_data, ood_data)
    settings = dict(model=model or models.EMBEDDED_NAME, config=asdict(base), ks=ks)
    settings |= dict(eval_data=eval_data, ood_data=ood_data, eval_tokens=eval_tokens)
    rows = previous_rows(out / "sweep.json", settings)
    done = {(r["strategy"], r["replace"], r["k"]) for r in rows}
    lm, tok = models.load(model, dtype=dtype, device=device)

    def ppl(m) -> tuple[float | None, ...]:
        on_progress("held-out perplexity", 0, 0)
        sources = (eval_data, ood_data)
        return held_out_perplexities(m, tok, sources, base.seq_len, eval_tokens, base.batch_size)

    def add(row: dict) -> None:
        rows.append(row)
        done.add((row["strategy"], row["replace"], row["k"]))
        _write(out, settings, rows, __version__)
        if on_row is not None:
            on_row(row)

    if 0 in ks and ("original", "none", 0) not in done:
        add(_row("original", "none", 0, ppl(lm), [], 0.0, 0))
    for s, r in ((s, r) for s in strategies for r in replacements):
        if todo := [k for k in ks if k > 0 and (s, r, k) not in done]:
            cfg = replace(base, strategy=s, replace=r)
            _cell(lm, tok, hf_config, cfg, todo, ppl, add, on_progress)
    return rows


def _grid(
    hf_config, base: PruneConfig, methods, stand_ins, ks
) -> tuple[list[str], list[str], list[int]]:
    """The sweep's strategies (``methods``), replacements (``stand_ins``) and counts, parsed
    and checked before any work."""
    if isinstance(methods, str):
        known = strategies.names()
        if methods.strip() == "all":
            known = tuple(m for m in known if strategies.get(m).sweepable)
        methods = parse_list(methods, known, "strategy")
    if isinstance(stand_ins, str):
        stand_ins = parse_list(stand_ins, REPLACEMENTS, "replacement")
    n = getattr(hf_config, arch.n_layers_key(hf_config))
    ks = parse_ks(ks, n) if isinstance(ks, str) else sorted(set(ks))
    for m in methods:
        if not strategies.get(m).sweepable:
            raise LinearizeError(f"--sweep compares strategies over counts; it does not take '{m}'")
    for m in methods:
        replace(base, strategy=m, replace=stand_ins[0], remove=max(max(ks), 1)).check(n)
    return list(methods), list(stand_ins), ks


def _cell(lm, tok, hf_config, cfg: PruneConfig, todo: list[int], ppl, add, progress) -> None:
    """One strategy × replacement at every count in ``todo``: a greedy run once up to the
    largest count, any other strategy once per count, each on a fresh copy of ``lm``. With
    ``--reconstruct`` a greedy run is read at its end only (the refits come after the last
    cut), so it runs once per count too."""
    if replacements.get(cfg.replace).needs_mlp_before:
        try:
            arch.check_foldable(hf_config)
        except LinearizeError as e:
            for k in todo:
                add(_na(cfg.strategy, cfg.replace, k, str(e)))
            return
    if strategies.get(cfg.strategy).greedy and not cfg.refits:
        _run_sequential(lm, tok, replace(cfg, remove=max(todo)), todo, ppl, add, progress)
        return
    for k in todo:
        m = copy.deepcopy(lm)
        res = prune_model_(m, tok, replace(cfg, remove=k), None, _named(progress, cfg, k))
        add(
            _row(
                cfg.strategy, cfg.replace, k, ppl(m), res.removed, res.elapsed_s, res.forward_passes
            )
        )
        del m


def _named(progress: Progress, cfg: PruneConfig, k: int) -> Progress:
    """``progress`` with each phase prefixed by its cell."""
    cell = f"{cfg.strategy} / {cfg.replace} / k={k}"
    return lambda what, done, total: progress(f"{cell}: {what}", done, total)


def _run_sequential(lm, tok, cfg: PruneConfig, ks: list[int], ppl, add, progress) -> None:
    m = copy.deepcopy(lm)
    start = time.perf_counter()
    removed: list[int] = []

    def on_step(step: dict) -> None:
        removed.append(step["layer"])
        if len(removed) in ks:
            elapsed = round(time.perf_counter() - start, 2)
            add(_row(cfg.strategy, cfg.replace, len(removed), ppl(m), list(removed), elapsed, None))

    prune_model_(m, tok, cfg, on_step, _named(progress, cfg, cfg.remove))


def _row(s, r, k, ppl: tuple[float | None, float | None], removed, elapsed, passes) -> dict:
    return {
        "strategy": s,
        "replace": r,
        "k": k,
        "perplexity": ppl[0],
        "perplexity_ood": ppl[1],
        "removed": removed,
        "elapsed_s": elapsed,
        "forward_passes": passes,
        "note": "",
    }


def _na(s, r, k, why) -> dict:
    return {**_row(s, r, k, (None, None), [], 0.0, 0), "note": why}


def _num(x: float | None, fmt: str = ".2f") -> str:
    return format(x, fmt) if x else ""


def table_markdown(rows: list[dict]) -> str:
    head = (
        "| strategy | replace | k | perplexity | × original | out-of-domain perplexity | "
        "× original (ood) | removed (original numbering) | time (s) |\n"
    )
    head += "|---|---|---|---|---|---|---|---|---|\n"
    body = ""
    for r in png.with_ratios(rows):
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] else (r["note"] or "n/a")
        body += (
            f"| {r['strategy']} | {r['replace']} | {r['k']} | {ppl} | {_num(r['ratio'])} | "
            f"{_num(r.get('perplexity_ood'))} | {_num(r['ratio_ood'])} | "
            f"{','.join(map(str, r['removed']))} | {r['elapsed_s']} |\n"
        )
    return head + body


def _write(out: Path, settings: dict, rows: list[dict], version: str) -> None:
    rows = sorted(
        rows, key=lambda r: (r["strategy"] != "original", r["strategy"], r["replace"], r["k"])
    )
    full = png.with_ratios(rows)
    write_json(out / "sweep.json", {"settings": settings, "version": version, "rows": rows})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in full:
        w.writerow(dict(r, removed=" ".join(map(str, r["removed"]))))
    write_text(out / "sweep.csv", buf.getvalue())
    write_text(out / "sweep.md", table_markdown(rows))
    png.sweep_png(full, out / "sweep.png", settings["model"])
    render(out / "sweep.json")
