"""What every training loop here shares: atomic checkpoints, resume, the metrics CSV."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from linearize._io import TMP_PREFIX, write_json, write_text
from linearize.errors import LinearizeError


def check_finite_loss(logs: dict[str, float], step: int) -> None:
    """Stop a diverged run with one line before it can save NaN weights (earlier checkpoints
    stay as they are, so ``--resume`` restarts from the last good one)."""
    loss = logs.get("loss")
    if loss is not None and not math.isfinite(loss):
        raise LinearizeError(
            f"the loss became {loss} at step {step + 1}: the run diverged or "
            "the model holds NaN/inf (try a lower --lr); nothing of this step "
            "was saved"
        )


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete ``out/checkpoints/step-N`` (temporary ones are dot-prefixed)."""
    found = sorted(Path(out).glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def resume_step(acc, out: Path) -> int:
    """Load the newest checkpoint's accelerate state; returns its step (0 when there is none)."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return 0
    acc.load_state(str(ckpt / "state"))
    return int(json.loads((ckpt / "trainer.json").read_text())["step"])


def read_metrics(out: Path, up_to: int) -> list[dict]:
    """Rows of ``out/metrics.csv`` up to step ``up_to`` (what a resumed run continues)."""
    path = Path(out) / "metrics.csv"
    if not path.exists():
        return []
    return [r for r in csv.DictReader(io.StringIO(path.read_text())) if int(r["step"]) <= up_to]


def write_metrics(out: Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k != "tokens", k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(Path(out) / "metrics.csv", buf.getvalue())


def save_checkpoint(
    acc, out: Path, step: int, rows: list[dict], extra: Callable[[Path], None] | None = None
) -> None:
    """Every process writes its part of the state into a temporary directory; the main one
    renames it into place, so a kill never leaves a half-written checkpoint behind.
    ``extra(tmp)`` (main process) may add files, e.g. a loadable model for ``dynamics``."""
    final = Path(out) / "checkpoints" / f"step-{step}"
    tmp = final.with_name(
        f"{TMP_PREFIX}step-{step}"
    )  # a kill leaves it for the next claim to sweep
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "state"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if extra is not None:
            extra(tmp)
        write_json(tmp / "trainer.json", {"step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_metrics(out, rows)
    acc.wait_for_everyone()
