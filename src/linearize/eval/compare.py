"""``linearize compare``: one table and one figure across ``results.json`` files of ``eval``.

Each model becomes a row of scalar metrics: perplexity, each lm-eval task's headline metric
(``acc_norm`` if the task reports it, else ``acc``, else its first metric), each probing task's
best layer accuracy (mean pooling), the judge's mean scores, and, when ``eval --speed`` ran,
parameters and prefill/decode throughput, so a pruning sweep reads as a speed/quality
trade-off. The figure has one bar panel per
scalar metric and one per-layer accuracy panel per probing task (layers as a share of depth,
so pruned and unpruned models line up).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from linearize._io import claim_output, releases_output, write_json, write_text
from linearize._version import __version__
from linearize.errors import LinearizeError
from linearize.report import png, render

_HEADLINE = ("acc_norm", "acc", "exact_match", "f1")


def read_results(spec: str | Path) -> dict:
    """``results.json`` from an eval output directory or the file itself."""
    path = Path(spec)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise LinearizeError(f"no results.json at '{spec}' (run linearize eval first)")
    try:
        res = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LinearizeError(f"'{path}' is not a valid results.json") from None
    if not isinstance(res, dict) or "model" not in res:
        raise LinearizeError(f"'{path}' is not a linearize eval results.json (no 'model')")
    return res


def metrics_row(res: dict) -> dict[str, float]:
    """The scalar metrics of one model, in a stable column order."""
    row: dict[str, float] = {}
    if isinstance(res.get("perplexity"), (int, float)):
        row["perplexity"] = res["perplexity"]
    for task, metrics in sorted(res.get("lm_eval", {}).items()):
        key = next((k for k in _HEADLINE if k in metrics), next(iter(metrics), None))
        if key is not None:
            row[f"{task}/{key}"] = metrics[key]
    for task, layers in sorted(res.get("probe", {}).items()):
        best = max(layers, key=lambda r: r["accuracy"])
        row[f"probe {task}/best"] = best["accuracy"]
        row[f"probe {task}/best layer"] = best["layer"]
    for aspect, v in res.get("judge", {}).get("mean", {}).items():
        row[f"judge/{aspect}"] = v
    speed = res.get("speed") or {}
    for key, name in _SPEED:
        if isinstance(speed.get(key), (int, float)):
            row[name] = speed[key]
    return row


_SPEED = (
    ("params_m", "params (M)"),
    ("prefill_tok_s", "speed/prefill tok/s"),
    ("decode_tok_s_b1", "speed/decode tok/s (b=1)"),
    ("decode_tok_s_batch", "speed/decode tok/s (batch)"),
)


@releases_output
def compare(specs: list[str], out: str | Path, labels: list[str] | None = None) -> list[dict]:
    """Write compare.json/.csv/.md/.png/.html in ``out``; returns the rows."""
    if not specs:
        raise LinearizeError("give at least one eval output directory")
    results = [read_results(s) for s in specs]
    labels = labels or [Path(s).name if Path(s).is_dir() else Path(s).parent.name for s in specs]
    if len(labels) != len(results):
        raise LinearizeError("--labels needs one label per directory")
    out = Path(out)
    claim_output(out)
    rows = [
        {"label": lab, "model": r["model"], **metrics_row(r)} for lab, r in zip(labels, results)
    ]
    cols = ["label", "model"] + sorted(
        {k for r in rows for k in r} - {"label", "model"}, key=lambda k: (k != "perplexity", k)
    )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(out / "compare.csv", buf.getvalue())
    write_text(out / "compare.md", table_markdown(rows, cols))
    probes = {lab: r.get("probe", {}) for lab, r in zip(labels, results)}
    write_json(
        out / "compare.json",
        {
            "sources": [str(s) for s in specs],
            "columns": cols,
            "rows": rows,
            "probes": probes,
            "version": __version__,
        },
    )
    png.compare_png(rows, cols[2:], probes, out / "compare.png")
    render(out / "compare.json")
    return rows


def table_markdown(rows: list[dict], cols: list[str]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
