"""``linearize dynamics``: the analysis core over a series of checkpoints.

A series is any list of models: local checkpoint directories, the output directory of
``pretrain`` / ``finetune`` / ``distill`` (expanded to its checkpoints in step order, then
``final``), or Hub revisions such as ``EleutherAI/pythia-160m@step1000``. Each one is loaded,
scored on the same tokens and freed, so the series may be longer than memory holds. The step
of a checkpoint is read from its name (``step-N``, ``stepN``, ``checkpoint-N``,
``global_stepN``); otherwise it is its position in the series. Results are rewritten after
every checkpoint, and a rerun with the same settings skips the ones already done.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

from linearize._io import claim_output, previous_rows, releases_output, write_json, write_text
from linearize.analyze import analyze_model
from linearize.errors import LinearizeError
from linearize.models import load
from linearize.report import png, render

_STEP = re.compile(r"(?:global_step|step-?|checkpoint-)(\d+)")


def expand(specs: list[str]) -> list[str]:
    """Checkpoint specs in order: a training output directory becomes its checkpoints."""
    found: list[str] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir() and not (p / "config.json").exists():
            inner = [
                q / "model"
                for q in p.glob("checkpoints/step-*")
                if (q / "model" / "config.json").exists()
            ]
            inner += [q for q in p.glob("checkpoint-*") if (q / "config.json").exists()]
            inner.sort(key=lambda q: step_of(str(q), 0))
            final = p / "final"
            last = step_of(str(inner[-1]), -1) if inner else -1
            if (final / "config.json").exists() and step_of(str(final), -2) != last:
                inner.append(final)  # unless it is the last checkpoint again
            if not inner:
                raise LinearizeError(f"'{spec}' holds no checkpoints (no config.json inside)")
            found += [str(q) for q in inner]
        else:
            found.append(spec)
    return found


def step_of(spec: str, default: int) -> int:
    """The training step in a checkpoint's name; for a run's ``final``, the step its summary
    (pretrain.json, finetune.json, distill.json) records."""
    found = _STEP.findall(spec)  # the last one: ".../step-200/model" -> 200
    if found:
        return int(found[-1])
    p = Path(spec)
    if p.name == "final":
        for name in ("pretrain.json", "finetune.json", "distill.json"):
            if (p.parent / name).is_file():
                return int(json.loads((p.parent / name).read_text()).get("steps", default))
    return default


@releases_output
def dynamics(
    specs: list[str],
    data_source: str = "builtin:eval",
    tokens: int = 16384,
    seq_len: int = 512,
    batch_size: int = 8,
    out: str | Path = "linearize-out/dynamics",
    dtype: str = "float32",
    device: str = "auto",
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per checkpoint: step, mean scores and per-layer scores; writes the outputs."""
    series = expand(specs)
    if not series:
        raise LinearizeError("give at least one checkpoint")
    out = Path(out)
    claim_output(out)
    settings = {"data": data_source, "tokens": tokens, "seq_len": seq_len, "dtype": dtype}
    done = {r["checkpoint"]: r for r in previous_rows(out / "dynamics.json", settings)}
    rows = []
    for i, spec in enumerate(series):
        if spec in done:
            rows.append(done[spec])
            continue
        model, tok = load(spec, dtype=dtype, device=device)
        rep = analyze_model(model, tok, data_source, tokens, seq_len, batch_size, model_name=spec)
        del model
        row = {
            "checkpoint": spec,
            "step": step_of(spec, i),
            "tokens": rep.tokens,
            **rep.means(),
            "layers": rep.layers,
        }
        rows.append(row)
        _write(out, settings, rows)
        if on_row is not None:
            on_row(row)
    _write(out, settings, rows)
    return rows


def table_markdown(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| checkpoint | step | mean linearity | Δ | mean linearity w/o residual | Δ |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        d1 = r["mean_linearity"] - base["mean_linearity"]
        d2 = r["mean_linearity_no_residual"] - base["mean_linearity_no_residual"]
        lines.append(
            f"| {r['checkpoint']} | {r['step']} | {r['mean_linearity']:.4f} | {d1:+.4f} | "
            f"{r['mean_linearity_no_residual']:.4f} | {d2:+.4f} |"
        )
    return "\n".join(lines) + "\n"


def _write(out: Path, settings: dict, rows: list[dict]) -> None:
    write_json(out / "dynamics.json", {"settings": settings, "rows": rows})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["checkpoint", "step", "layer", "linearity", "linearity_no_residual", "cosine"])
    for r in rows:
        for layer in r["layers"]:
            w.writerow(
                [
                    r["checkpoint"],
                    r["step"],
                    layer["layer"],
                    layer["linearity"],
                    layer["linearity_no_residual"],
                    layer["cosine"],
                ]
            )
    write_text(out / "dynamics.csv", buf.getvalue())
    write_text(out / "dynamics.md", table_markdown(rows))
    png.dynamics_png(rows, out / "dynamics.png")
    render(out / "dynamics.json")
