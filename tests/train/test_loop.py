"""The one training loop on its own, with a toy model: what every command relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linearize.errors import LinearizeError
from linearize.train.loop import Every, Loop, Schedule

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 1, bias=False)


def _mse_step(loop: Loop, rows_per_micro: int):
    def step(index: int) -> dict[str, torch.Tensor]:
        i = (index * rows_per_micro) % len(X)
        x, y = X[i : i + rows_per_micro], Y[i : i + rows_per_micro]
        loss = (loop.model(x) - y).square().mean()
        return {"loss": loss, "half": loss / 2}

    return step


def _train(tmp_path, name: str, grad_accum: int, steps: int = 3, rows=None, **every) -> Loop:
    loop = Loop(tmp_path / name, grad_accum=grad_accum, device="cpu")
    loop.prepare(_model(), Schedule(lr=0.1, total_steps=steps, warmup=0.0, max_grad_norm=1e9))
    rows = rows or len(X) // grad_accum
    loop.tokens_per_step(seq_len=1, batch_size=rows, tokens=10**6)  # one "token" per row
    loop.run(_mse_step(loop, rows), Every(save_every=10**9, **every))
    return loop


def test_accumulated_micro_steps_equal_one_full_batch(tmp_path):
    one = _train(tmp_path, "one", grad_accum=1).unwrapped().weight
    two = _train(tmp_path, "two", grad_accum=2).unwrapped().weight
    assert torch.allclose(one, two, atol=1e-6)
    # and the data tells the cases apart: one half-batch per step is another trajectory
    half = _train(tmp_path, "half", grad_accum=1, rows=4).unwrapped().weight
    assert not torch.allclose(one, half, atol=1e-3) and not torch.equal(one, _model().weight)


def test_rows_metrics_checkpoint_and_resume(tmp_path):
    seen: list[dict] = []
    evaluate = lambda step: {"probe": float(step)}  # noqa: E731
    loop = _train(tmp_path, "r", 1, 4, eval_every=2, evaluate=evaluate, on_step=seen.append)
    assert [r["step"] for r in seen] == [1, 2, 3, 4] and loop.finished
    assert [r.get("probe") for r in seen] == [None, 2.0, None, 4.0]
    assert [r["tokens"] for r in seen] == [8, 16, 24, 32] and loop.summary()["tokens_seen"] == 32
    assert seen[0]["half"] == pytest.approx(seen[0]["loss"] / 2)
    assert (tmp_path / "r" / "checkpoints" / "step-4" / "trainer.json").exists()
    assert (tmp_path / "r" / "metrics.csv").read_text().count("\n") == 5
    again = Loop(tmp_path / "r", device="cpu")
    sched = Schedule(lr=0.1, total_steps=4, warmup=0.0)
    assert again.prepare(_model(), sched, resume=True) == 4 and len(again.rows) == 4
    assert torch.allclose(again.unwrapped().weight, loop.unwrapped().weight)


def test_a_diverged_loss_stops_with_one_line_and_saves_nothing(tmp_path):
    loop = Loop(tmp_path / "nan", device="cpu")
    loop.prepare(_model(), Schedule(lr=0.1, total_steps=3))
    nan = lambda index: {"loss": loop.model(X).sum() * float("nan")}  # noqa: E731
    with pytest.raises(LinearizeError, match="diverged"):
        loop.run(nan, Every(save_every=1))
    assert not (tmp_path / "nan" / "checkpoints").exists()
    with pytest.raises(LinearizeError, match="less than one optimizer step"):
        loop.tokens_per_step(seq_len=16, batch_size=2, tokens=10)
