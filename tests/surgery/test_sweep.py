"""Pruning sweeps on a tiny saved model: every strategy × replacement, files, resume."""

from __future__ import annotations

import json

import pytest

from linearize.errors import LinearizeError
from linearize.surgery.prune import PruneConfig, strategies
from linearize.surgery.sweep import parse_ks, parse_list, sweep

BASE = PruneConfig(tokens=400, seq_len=48, batch_size=4, ppl_tokens=96)


def test_sweep_writes_every_cell_and_resumes(tiny_dir, tmp_path):
    out = tmp_path / "sweep"
    rows = sweep(
        str(tiny_dir),
        BASE,
        "0,1,2",
        "all",
        "none,linear,fold",
        "builtin:eval",
        400,
        out,
        device="cpu",
    )
    # the original + every strategy but 'layers' (the registry's sweepable ones) × 3
    # replacements × 2 counts
    sweepable = [s for s in strategies.names() if strategies.get(s).sweepable]
    assert "layers" not in sweepable and len(sweepable) == 9  # search included
    assert {r["strategy"] for r in rows} == {"original", *sweepable}
    assert len(rows) == 1 + 9 * 3 * 2
    assert all(r["perplexity"] and r["perplexity"] > 1 for r in rows)
    assert all(len(r["removed"]) == r["k"] for r in rows)
    for name in ("sweep.json", "sweep.csv", "sweep.md", "sweep.png", "sweep.html"):
        assert (out / name).stat().st_size > 0
    assert "| original | none | 0 |" in (out / "sweep.md").read_text()
    before = json.loads((out / "sweep.json").read_text())["rows"]
    again = sweep(
        str(tiny_dir),
        BASE,
        "0,1,2",
        "all",
        "none,linear,fold",
        "builtin:eval",
        400,
        out,
        device="cpu",
        on_row=lambda r: pytest.fail("a finished cell was redone"),
    )
    assert len(again) == len(before)


def test_sweep_arguments():
    assert parse_list("all", ("a", "b"), "x") == ["a", "b"]
    assert parse_list("b, a", ("a", "b"), "x") == ["b", "a"]
    assert parse_ks("8,0,4", 30) == [0, 4, 8]
    with pytest.raises(LinearizeError, match="unknown strategy"):
        parse_list("linear-greedy,nope", ("linear-greedy",), "strategy")
    with pytest.raises(LinearizeError, match="must be in 0..29"):
        parse_ks("0,30", 30)
