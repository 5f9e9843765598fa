"""linearize.surgery.restart: a pass started at a stored boundary state gives the same states
downstream as the whole forward pass, and the hooks it puts on come off."""

from __future__ import annotations

import torch
from conftest import make_tiny

from linearize import arch
from linearize.surgery.restart import run_from


def _states(model, batches, start, stop, state=None) -> dict[tuple[int, int], torch.Tensor]:
    seen = {}
    run_from(
        model, batches, start, stop, state, lambda b, j, h: seen.__setitem__((b, j), h.clone())
    )
    return seen


def test_a_pass_from_a_stored_state_equals_the_whole_pass():
    model = make_tiny("llama", torch.float64, num_hidden_layers=4)
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(2))
    batches = [
        {"input_ids": ids[:1], "attention_mask": torch.ones_like(ids[:1])},
        {"input_ids": ids[1:], "attention_mask": torch.ones_like(ids[1:])},
    ]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    whole = _states(model, batches, 0, 4)
    assert sorted({j for _, j in whole}) == [0, 1, 2, 3, 4]
    part = _states(model, batches, 2, 4, lambda b: whole[(b, 2)])
    for b in range(2):
        for j in (3, 4):
            torch.testing.assert_close(part[(b, j)], whole[(b, j)], rtol=0, atol=1e-12)
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert after == hooks
    assert arch.n_layers(model) == 4


def test_the_store_counts_what_is_on_disk_now_and_at_most(tmp_path):
    from linearize.surgery.restart import BoundaryStore

    store = BoundaryStore(ram_bytes=0, spill_dir=tmp_path)
    t = torch.zeros(256, dtype=torch.float32)  # 1 KiB
    store.put(("o", 0, 0), t)
    store.put(("o", 1, 0), t)
    assert store.on_disk == store.peak_disk == 2048
    store.drop(("o", 0, 0))
    store.put(("o", 0, 0), t)  # rewritten: one more KiB written, none more held
    assert store.on_disk == 2048 and store.peak_disk == 2048 and store.spilled == 3072
    torch.testing.assert_close(store.get(("o", 1, 0)), t)
    store.close()
    assert store.on_disk == 0 and not any(tmp_path.iterdir())
