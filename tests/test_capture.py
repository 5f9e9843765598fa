"""linearize.capture: what LayerCapture streams into the statistics equals the statistics of
the stacked states, padding left out."""

from __future__ import annotations

import torch
from conftest import make_tiny

from linearize import arch
from linearize.capture import collect_stats, masked_rows
from linearize.hooks import record
from linearize.stats import PairStats


def test_masked_rows_drops_the_padding_rows():
    h = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).reshape(-1).bool()
    assert masked_rows(h, None).shape == (6, 4)
    torch.testing.assert_close(masked_rows(h, mask), h.reshape(6, 4)[[0, 1, 3]])


def test_streamed_statistics_equal_those_of_the_stacked_states():
    model = make_tiny("llama", torch.float64)
    _, layers = arch.get_layers(model)
    ids = torch.randint(3, 500, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding at the end of one sequence
    batches = [
        {"input_ids": ids[:2], "attention_mask": mask[:2]},
        {"input_ids": ids[2:], "attention_mask": mask[2:]},
    ]
    streamed = collect_stats(model, batches)
    keep = mask.reshape(-1).bool()
    with torch.no_grad(), record(inputs=list(layers), outputs=list(layers)) as rec:
        xs, ys = {}, {}
        for b in batches:
            model(**b)
            for i in range(len(layers)):
                xs.setdefault(i, []).append(rec.inputs[i].reshape(-1, rec.inputs[i].shape[-1]))
                ys.setdefault(i, []).append(rec.outputs[i].reshape(-1, rec.outputs[i].shape[-1]))
    for i in range(len(layers)):
        ref = PairStats()
        ref.update(torch.cat(xs[i])[keep], torch.cat(ys[i])[keep])
        assert streamed[i].n == int(keep.sum())
        for key, value in ref.scores().items():
            assert abs(streamed[i].scores()[key] - value) < 1e-9, (i, key)
