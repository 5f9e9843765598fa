"""What a linear bridge costs at inference: one model timed with its bridges on and off.

    python benchmarks/bridge_cost.py CHECKPOINT [--rounds 15] [--new-tokens 64]

CHECKPOINT is a ``linearize prune --replace linear`` output. The same loaded model runs with
its bridges applied and with them switched to the identity (which makes it, for speed, the
``--replace none`` model of the same depth: the same weights in the same memory), alternating
A/B B/A every round, so drift on a noisy machine hits both alike. Timed: a prefill forward of
``--batch-size`` × ``--seq-len`` tokens and a greedy ``generate()`` of ``--new-tokens`` tokens at
batch 1. Prints the medians and the bridges' cost (on ÷ off − 1), the number that decides
whether ``--replace linear`` is slower than ``fold`` (a stock model with no bridge). Below the
noise of whole passes, the bridges alone are also timed on the same shapes (the prefill's
rows, and one token's row as in decoding), as a share of the median pass with them off.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from linearize import data, load
from linearize.surgery._remote_modeling import AffineBridge


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    model, tok = load(a.checkpoint, dtype="float32", device="cpu")
    bridges = [m for m in model.modules() if isinstance(m, AffineBridge)]
    if not bridges:
        raise SystemExit(f"{a.checkpoint} has no bridge (prune it with --replace linear)")
    seqs = list(data.token_sequences(tok, "builtin:eval", a.seq_len, a.seq_len * a.batch_size))
    ids = torch.tensor(seqs[: a.batch_size])
    prompt = ids[:1, :32]
    pad = data.pad_id_of(tok)

    @torch.no_grad()
    def prefill() -> None:
        model(input_ids=ids, use_cache=False)

    @torch.no_grad()
    def decode() -> None:
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=a.new_tokens,
            min_new_tokens=a.new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )

    times = _alternate(bridges, {"prefill": prefill, "decode": decode}, a.rounds)
    d = model.config.hidden_size
    params = sum(p.numel() for p in model.parameters())
    share = len(bridges) * (d * d + d) / params
    print(f"{a.checkpoint}: {len(bridges)} bridge(s), {share:.2%} of the parameters")
    alone = {
        "prefill": _bridges_alone(bridges, (a.batch_size, a.seq_len, d), 20),
        "decode": a.new_tokens * _bridges_alone(bridges, (1, 1, d), 2000),
    }
    for name in ("prefill", "decode"):
        on = statistics.median(times[(name, True)])
        off = statistics.median(times[(name, False)])
        print(
            f"{name:8s} bridges on {on:.3f} s, off {off:.3f} s: cost {on / off - 1:+.2%}; "
            f"the bridges alone {alone[name] * 1000:.2f} ms = {alone[name] / off:.3%} of the pass"
        )


def _switch(bridges: list[AffineBridge], on: bool) -> None:
    for b in bridges:
        if on:
            b.__dict__.pop("forward", None)
        else:
            b.forward = lambda h: h  # identity: the hook still runs, the matmul does not


def _alternate(
    bridges: list[AffineBridge], passes: dict[str, Callable[[], None]], rounds: int
) -> dict[tuple[str, bool], list[float]]:
    """Seconds of each pass with the bridges on and off, A/B then B/A round after round; a
    first round warms up and is not kept. The bridges are on again afterwards."""
    times: dict[tuple[str, bool], list[float]] = {}
    try:
        for r in range(-1, rounds):
            for on in (True, False) if r % 2 == 0 else (False, True):
                _switch(bridges, on)
                for name, fn in passes.items():
                    t = _timed(fn)
                    if r >= 0:
                        times.setdefault((name, on), []).append(t)
    finally:
        _switch(bridges, True)
    return times


@torch.no_grad()
def _bridges_alone(bridges: list[AffineBridge], shape: tuple[int, ...], calls: int) -> float:
    """Seconds the bridges take on one input of ``shape`` (median of 5 runs of ``calls``)."""
    h = torch.randn(shape)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            for b in bridges:
                b(h)
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs)


if __name__ == "__main__":
    main()
