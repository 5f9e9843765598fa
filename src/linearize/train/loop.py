"""The one training loop, on accelerate: placement, gradient accumulation, clipping, AdamW with a
cosine schedule, atomic checkpoints, resume, the metrics CSV and TensorBoard.

A command (``distill``, ``pretrain``) brings only its model, its data and a loss step:
``loss_step(index) -> {"loss": tensor, other logged parts...}`` for micro-batch ``index``.
Everything that makes a run survive a kill and resume where it stopped lives here, once.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from linearize import offload
from linearize._io import TMP_PREFIX, atomic_dir, space_errors, write_json, write_text
from linearize._version import __version__
from linearize.errors import LinearizeError, first_line
from linearize.hooks import eval_mode


@dataclass
class Schedule:
    """The optimiser and its schedule: AdamW, linear warm-up, cosine decay to 0."""

    lr: float
    total_steps: int
    warmup: float = 0.05  # share of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Every:
    """What happens between optimizer steps: held-out evaluation every ``eval_every`` steps (and
    at the last; its dict joins the metrics row), a checkpoint every ``save_every`` steps (and
    when the run stops); ``save_extra(tmp)`` adds files to a checkpoint (main process)."""

    save_every: int
    eval_every: int = 0
    evaluate: Callable[[int], dict] | None = None
    save_extra: Callable[[Path], None] | None = None
    on_step: Callable[[dict], None] | None = None


class Loop:
    """One run's accelerator, optimiser, schedule, step counter and metrics rows."""

    def __init__(self, out: str | Path, grad_accum: int = 1, device: str = "auto") -> None:
        from accelerate import Accelerator

        self.out = Path(out)
        self.cpu = device == "cpu" or not torch.cuda.is_available()
        self.tensorboard = importlib.util.find_spec("tensorboard") is not None
        self.acc = Accelerator(
            gradient_accumulation_steps=grad_accum,
            cpu=self.cpu,
            mixed_precision="no" if self.cpu else "bf16",
            log_with="tensorboard" if self.tensorboard else None,
            project_dir=str(self.out),
        )
        self.grad_accum = grad_accum
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.device = "cpu" if self.cpu else str(self.acc.device)
        self.step = 0
        self.step_tokens = 0  # set by tokens_per_step()
        self.rows: list[dict] = []
        self.elapsed = 0.0

    def tokens_per_step(self, seq_len: int, batch_size: int, tokens: int) -> int:
        """Tokens of one optimizer step over all processes, remembered for the metrics and the
        summary; a budget under one step is an error."""
        self.step_tokens = step_tokens(tokens, seq_len, batch_size, self.grad_accum, self.world)
        return self.step_tokens

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def prepare(self, model: nn.Module, schedule: Schedule, resume: bool = False) -> int:
        """Optimise ``model``'s trainable parameters; with ``resume``, continue from the newest
        checkpoint in ``out``. Returns the step the run starts at."""
        from transformers import get_cosine_schedule_with_warmup

        self.schedule = schedule
        self.params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            self.params, lr=schedule.lr, weight_decay=schedule.weight_decay, betas=schedule.betas
        )
        sched = get_cosine_schedule_with_warmup(
            opt, math.ceil(schedule.warmup * schedule.total_steps), schedule.total_steps
        )
        offloaded = offload.is_offloaded(model)
        if offloaded:  # frozen weights read from their checkpoint: a checkpoint skips them
            self.acc.register_save_state_pre_hook(_drop_offloaded)
        self.model, self.opt, self.sched = self.acc.prepare(model, opt, sched)
        if resume:
            self.step = resume_step(self.acc, self.out, strict=not offloaded)
            self.rows = read_metrics(self.out, self.step)
        return self.step

    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    def run(
        self,
        loss_step: Callable[[int], dict[str, Tensor]],
        every: Every,
        stop_at: int | None = None,
    ) -> None:
        """Optimizer steps until ``stop_at`` (default: the schedule's end); a checkpoint is
        written at the last one, so a run stopped early resumes from there."""
        total = self.schedule.total_steps
        stop_at = total if stop_at is None else min(stop_at, total)
        start = time.perf_counter()
        if self.tensorboard:
            self.acc.init_trackers("tensorboard")
        self.model.train()
        try:
            while self.step < stop_at:
                logs = self._optimizer_step(loss_step)
                check_finite_loss(logs, self.step)
                self.step += 1
                row = {
                    "step": self.step,
                    "tokens": self.step * self.step_tokens,
                    "lr": self.sched.get_last_lr()[0],
                    **logs,
                }
                if every.evaluate is not None and (
                    self.step % every.eval_every == 0 or self.step == total
                ):
                    with eval_mode(self.model):
                        row.update(every.evaluate(self.step))
                self._record(row, every.on_step)
                if self.step % every.save_every == 0 or self.step == stop_at:
                    save_checkpoint(self.acc, self.out, self.step, self.rows, every.save_extra)
        finally:
            self.elapsed += time.perf_counter() - start
            for tracker in self.acc.trackers if self.tensorboard else ():
                tracker.finish()  # not acc.end_training(): it ends the process group too

    def _optimizer_step(self, loss_step: Callable[[int], dict[str, Tensor]]) -> dict[str, float]:
        """``grad_accum`` micro-steps, clipping, one optimizer and schedule step; returns the
        loss parts averaged over micro-steps and processes, for the log."""
        logs: dict[str, float] = {}
        for j in range(self.grad_accum):
            with self.acc.accumulate(self.model):
                parts = loss_step(self.step * self.grad_accum + j)
                self.acc.backward(parts["loss"])
                if self.acc.sync_gradients:
                    self.acc.clip_grad_norm_(self.params, self.schedule.max_grad_norm)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad()
            for k, v in parts.items():
                mean = float(self.acc.reduce(v.detach().float(), "mean"))
                logs[k] = logs.get(k, 0.0) + mean / self.grad_accum
        return logs

    def _record(self, row: dict, on_step: Callable[[dict], None] | None) -> None:
        self.rows.append(row)
        if self.tensorboard:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=self.step)
        if on_step is not None and self.is_main:
            on_step(row)

    def summary(self) -> dict:
        """What every run's summary JSON says about the loop itself."""
        return {
            "steps": self.step,
            "total_steps": self.schedule.total_steps,
            "tokens_seen": self.step * self.step_tokens,
            "elapsed_s": round(self.elapsed, 2),
            "world_size": self.world,
            "version": __version__,
        }

    @property
    def finished(self) -> bool:
        return self.step >= self.schedule.total_steps

    def save_final(self, write: Callable[[Path], None]) -> None:
        """``out/final``, written by the main process into a temporary directory and renamed
        into place once complete."""
        self.acc.wait_for_everyone()
        if self.is_main:
            atomic_dir(self.out / "final", write)


def step_tokens(tokens: int, seq_len: int, batch_size: int, grad_accum: int, world: int) -> int:
    """Tokens of one optimizer step; a budget of ``tokens`` under one step is an error (checked
    before any work where the settings are known, as compress does for its heal stage)."""
    per_step = seq_len * batch_size * grad_accum * world
    if tokens < per_step:
        raise LinearizeError(
            f"--tokens {tokens} is less than one optimizer step "
            f"({batch_size}×{seq_len}×{grad_accum}×{world} = {per_step} tokens)"
        )
    return per_step


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


def checkpoints(out: Path) -> list[Path]:
    """The complete ``out/checkpoints/step-N``, oldest first (temporary ones are dot-prefixed)."""
    found = [p for p in Path(out).glob("checkpoints/step-*") if p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete ``out/checkpoints/step-N``."""
    found = checkpoints(out)
    return found[-1] if found else None


def _drop_offloaded(models: list, weights: list[dict], output_dir: str) -> None:
    """accelerate's save-state pre-hook: leave out the weights that are offloaded (on the
    meta device here), which the run never changes."""
    for state in weights:
        for key in [k for k, v in state.items() if v.device.type == "meta"]:
            del state[key]


def resume_step(acc, out: Path, strict: bool = True) -> int:
    """Load the newest checkpoint's accelerate state that reads; returns its step (0 when there
    is none). A checkpoint damaged on disk (a file cut short by a full disk, a bad copy) is
    skipped with a warning for the one before it; if none reads, one line names the broken
    file. ``strict`` False: the checkpoint may lack the weights an offloaded model never
    changes."""
    found = checkpoints(out)
    broken: list[str] = []
    for ckpt in reversed(found):
        try:
            step = int(json.loads((ckpt / "trainer.json").read_text())["step"])
            acc.load_state(str(ckpt / "state"), strict=strict)
        except Exception as e:  # safetensors, torch.load, json: each its own kind of error
            broken.append(f"{_damaged_file(ckpt, e)} ({first_line(e)[:120]})")
            warnings.warn(f"checkpoint {ckpt} cannot be read: {broken[-1]}", stacklevel=2)
            continue
        if broken:
            warnings.warn(f"resuming from the earlier checkpoint {ckpt}", stacklevel=2)
        return step
    if broken:
        raise LinearizeError(
            f"no checkpoint in {Path(out) / 'checkpoints'} can be read: {broken[0]}; delete "
            "the broken checkpoints to start over"
        )
    return 0


def _damaged_file(ckpt: Path, e: Exception) -> Path:
    """The file of ``ckpt`` that ``e`` was about: named in the error, else the last one the
    load would have read (accelerate reads the weights, then the optimizer, then the rest)."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    named = [p for p in files if str(p) in str(e) or p.name in str(e)]
    if named:
        return named[0]
    for name in ("trainer.json", "model.safetensors", "optimizer.bin", "scheduler.bin"):
        for p in files:
            if p.name == name and not _loads(p):
                return p
    return ckpt


def _loads(path: Path) -> bool:
    """Whether the file at ``path`` parses as what its name says it is."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
        else:
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


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
    tmp = final.with_name(f"{TMP_PREFIX}step-{step}")  # a kill leaves it for the next claim
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    try:
        with space_errors(final):  # a full disk: one line, and the earlier checkpoints stand
            acc.save_state(str(tmp / "state"))
            acc.wait_for_everyone()
            if acc.is_main_process:
                if extra is not None:
                    extra(tmp)
                write_json(tmp / "trainer.json", {"step": step})
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                write_metrics(out, rows)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # what was written of it, not left on a full disk
        raise
    acc.wait_for_everyone()
