"""Forward hooks that stream each decoder layer's input and output into PairStats.

One forward pass of the decoder body (no LM head) per batch. Each hook reduces its layer's
(B, T, d) states to d×d moments at once, so no layer's states outlive its own call and the
states of all layers are never held together. The pass stops right after the last layer we
score. Padding tokens are dropped with the attention mask before anything is accumulated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack

import torch
import torch.distributed as dist
from torch import Tensor, nn

from linearize import arch
from linearize.errors import LinearizeError
from linearize.hooks import StopForward, eval_mode, hooks, layer_input, layer_output
from linearize.stats import PairStats, first_nonfinite, row_cosine, typical_rows, unshift_


class LayerCapture:
    """Hooks on chosen decoder layers that accumulate PairStats for each of them.

    Consecutive layers share moments: when layer i's input is the very tensor layer i−1
    returned (true in every plain decoder stack on one device), layer i borrows the output
    moments of layer i−1 instead of computing its own (see PairStats.x_source).
    ``massive``: leave out rows whose norm passes that many times the batch's median
    (stats.typical_rows); layers then keep their own moments, as their rows differ.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        indices: Sequence[int],
        stop_at_last: bool = True,
        fast: bool = False,
        massive: float = 0.0,
    ) -> None:
        self.layers = layers
        self.fast = fast
        self.massive = massive
        self.indices = sorted(set(indices))
        self.stop_at_last = stop_at_last
        self.stats: dict[int, PairStats] = {}
        self._mask: Tensor | None = None  # (B*T,) bool, None when every token counts
        self._inputs: dict[int, Tensor] = {}
        self._last_out: tuple[int, Tensor, Tensor] | None = None  # (layer, raw y, its rows)
        self._hooks = ExitStack()
        self._shared: dict[int, bool] = {}

    # -- hooks ----------------------------------------------------------------------------
    def _rows(self, h: Tensor) -> Tensor:
        return masked_rows(h, self._mask)

    def _pre(self, i: int) -> Callable:
        def hook(module, args, kwargs):
            self._inputs[i] = layer_input(args, kwargs)

        return hook

    def _post(self, i: int, stop: bool) -> Callable:
        def hook(module, args, kwargs, out):
            x_raw, y_raw = self._inputs.pop(i), layer_output(out)
            prev = self._last_out
            shared = prev is not None and prev[0] == i - 1 and prev[1] is x_raw
            shared = shared and not self.massive
            if i not in self._shared:  # decided on the first batch, then held to
                self._shared[i] = shared
                source = self.stats[i - 1] if shared else None
                self.stats[i] = PairStats(x_source=source, fast=self.fast)
            elif self._shared[i] != shared:
                raise RuntimeError(
                    f"layer {i}: its input stopped being layer {i - 1}'s output between batches"
                )
            x = prev[2] if shared else self._rows(x_raw)
            y = self._rows(y_raw)
            if self.massive:
                keep = typical_rows(x, y, self.massive)
                x, y = x[keep], y[keep]
            self.stats[i].update(x, y)
            self._last_out = (i, y_raw, y)
            if stop:
                raise StopForward

        return hook

    def __enter__(self) -> LayerCapture:
        last = self.indices[-1]
        pre = [(self.layers[i], self._pre(i)) for i in self.indices]
        post = [
            (self.layers[i], self._post(i, i == last and self.stop_at_last)) for i in self.indices
        ]
        self._hooks.enter_context(hooks(pre, post))
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.close()
        self._inputs.clear()
        self._last_out = None

    # -- driving --------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, body: nn.Module, batch: dict[str, Tensor], device: torch.device) -> int:
        """One forward of ``body`` on a batch; returns the number of real tokens."""
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        self.begin_batch(mask)
        try:
            body(input_ids=ids, attention_mask=mask, use_cache=False)
        except StopForward:
            pass
        finally:
            self.end_batch()
        return int(mask.sum())

    def begin_batch(self, mask: Tensor) -> None:
        """Set the padding mask of the batch about to run (when the caller drives the pass)."""
        self.end_batch()
        self._mask = None if bool(mask.all()) else mask.reshape(-1).bool()

    def end_batch(self) -> None:
        self._last_out = None
        self._inputs.clear()
        for s in self.stats.values():
            s.end_batch()  # rows kept for the next layer: not past the batch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _agree_on_layout(
    stats: dict[int, PairStats], cap: LayerCapture, indices: list[int], d: int, device: torch.device
) -> dict[int, PairStats]:
    """Give every rank the same borrowing layout, even a rank that saw no data."""
    code = torch.tensor(
        [0 if i not in cap._shared else 1 + int(cap._shared[i]) for i in indices],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    if stats:
        return stats
    out: dict[int, PairStats] = {}
    for i, c in zip(indices, code.tolist()):
        out[i] = PairStats(x_source=out[i - 1] if c == 2 else None)
        out[i]._alloc(d, device)
    return out


def all_reduce_stats_(stats: dict[int, PairStats]) -> None:
    """Sum statistics over all processes of a torch.distributed group, in place.

    The moments are sums, so a data-sharded run reduced this way equals a single-process run
    on the same tokens (up to float64 summation order).
    """
    if not _distributed():
        return
    unshift_(stats)  # each process chose its shifts from its own first batch
    for i in sorted(stats):
        s = stats[i]
        n = torch.tensor([float(s.n)], dtype=torch.float64, device=s.q.device)
        dist.all_reduce(n)
        s.n = int(n.item())
        for t in s.owned_tensors():
            dist.all_reduce(t)


def check_massive(factor: float) -> None:
    """Refuse a ``massive`` factor that would drop typical tokens: 0 is off, else above 1."""
    if factor < 0 or 0 < factor <= 1:
        raise LinearizeError(f"--massive must be 0 (off) or above 1, got {factor}")


def collect_stats(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    layers: Sequence[int] | None = None,
    on_batch: Callable[[int], None] | None = None,
    fast: bool = False,
    massive: float = 0.0,
) -> dict[int, PairStats]:
    """Accumulate PairStats for ``layers`` (default: all) of a causal LM over ``batches``.

    Runs the decoder body only (the LM head never runs). ``on_batch(tokens)`` is called after
    each batch, e.g. to move a progress bar. Under torch.distributed the result is summed
    over processes, each of which should have been given its own shard of the data.
    ``fast``: float32 products per batch (see PairStats), for float32/16 models.
    ``massive``: score without the tokens of massive norm (see LayerCapture).
    """
    _, module_list = arch.get_layers(model)
    indices = sorted(set(range(len(module_list)) if layers is None else layers))
    body = arch.get_body(model)
    device = arch.input_device(model)
    with eval_mode(model), LayerCapture(module_list, indices, fast=fast, massive=massive) as cap:
        for batch in batches:
            tokens = cap.run(body, batch, device)
            if on_batch is not None:
                on_batch(tokens)
    stats = cap.stats
    if _distributed():
        stats = _agree_on_layout(stats, cap, indices, model.config.hidden_size, device)
        all_reduce_stats_(stats)
    check_finite(stats, model)
    return stats


def check_finite(stats: dict[int, PairStats], model: nn.Module) -> None:
    """One line naming the first layer with NaN/inf states, instead of NaN scores downstream."""
    bad = first_nonfinite(stats)
    if bad is None:
        return
    layer, where = bad
    what = f"layer {layer} produced" if where == "output" else f"the input of layer {layer} holds"
    if next(model.parameters()).dtype == torch.float16:
        hint = "float16 overflows on this model: use --dtype bfloat16 or float32"
    else:
        hint = "the model's weights or activations hold NaN/inf"
    raise LinearizeError(f"{what} non-finite hidden states (NaN or inf); {hint}")


# -- spans and blocks: pairs that are not one layer's own input and output ---------------------
def masked_rows(h: Tensor, mask: Tensor | None) -> Tensor:
    rows = h.reshape(-1, h.shape[-1])  # (B*T, d), in the model's dtype: PairStats converts
    return rows if mask is None else rows[mask.to(rows.device)]


@torch.no_grad()
def collect_pair_stats(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    taps: dict[str, tuple[nn.Module, str]],
    pair: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]],
    last: str,
) -> PairStats:
    """PairStats of (x, y) = ``pair(tapped)`` over all real tokens of ``batches``.

    ``taps`` names the tensors to keep from each forward pass: name -> (module, "input" |
    "output"). The pass stops once the tap ``last`` has fired. Hooks are added after any that
    the module already has, so an input tap sees the input after a replacement bridge.
    """
    body = arch.get_body(model)
    device = arch.input_device(model)
    stats = PairStats()
    store: dict[str, Tensor] = {}

    def hook_for(name: str, kind: str):
        def keep(h):
            store[name] = layer_output(h)
            if name == last:
                raise StopForward

        if kind == "input":
            return lambda m, args, kwargs: keep(layer_input(args, kwargs))
        return lambda m, args, kwargs, out: keep(out)

    pre = [
        (module, hook_for(name, kind)) for name, (module, kind) in taps.items() if kind == "input"
    ]
    post = [
        (module, hook_for(name, kind)) for name, (module, kind) in taps.items() if kind != "input"
    ]
    with eval_mode(model), hooks(pre, post):
        for batch in batches:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            flat = None if bool(mask.all()) else mask.reshape(-1).bool()
            try:
                body(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            x, y = pair(store)
            stats.update(masked_rows(x, flat), masked_rows(y, flat))
            store.clear()
    if _distributed():
        all_reduce_stats_({0: stats})
    return stats


def span_stats(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], start: int, end: int
) -> PairStats:
    """(input of layer ``start``, output of layer ``end - 1``): what one affine map must do to
    stand in for the run of layers [start, end)."""
    _, layers = arch.get_layers(model)
    taps = {"x": (layers[start], "input"), "y": (layers[end - 1], "output")}
    return collect_pair_stats(model, batches, taps, lambda s: (s["x"], s["y"]), "y")


def fold_stats(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], start: int, end: int
) -> PairStats:
    """Pairs for folding the run [start, end) into the MLP output projection of layer
    ``start - 1`` (ReplaceMe): x = that projection's output m, y = the value it must take so
    that the layer's output becomes the run's output: h_{end} − h_{start} + m, where h_j is the
    residual stream entering layer j."""
    _, layers = arch.get_layers(model)
    taps = {
        "m": (arch.mlp_out_proj(model, start - 1), "output"),
        "h0": (layers[start - 1], "output"),
        "h1": (layers[end - 1], "output"),
    }

    def pair(s: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        m = s["m"].reshape(s["h0"].shape)  # OPT's fc2 works on flattened (B*T, d) rows
        return m, s["h1"] - s["h0"] + m

    return collect_pair_stats(model, batches, taps, pair, "h1")


@torch.no_grad()
def block_distances(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], k: int
) -> dict[str, list[float]]:
    """For every block of ``k`` consecutive layers starting at ℓ, two distances between the
    stream entering layer ℓ and the stream leaving layer ℓ+k−1:

    - ``angular_last``: arccos(cos)/π at each sequence's last real token, averaged over
      sequences (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers");
    - ``cosine_all``: 1 − cos averaged over all real tokens.

    Holds at most k+1 layer boundaries of one batch, never the whole stack's states.
    """
    _, layers = arch.get_layers(model)
    n = len(layers)
    starts = n - k + 1
    ang = torch.zeros(starts, dtype=torch.float64)
    cos_all = torch.zeros(starts, dtype=torch.float64)
    n_seq, n_tok = 0, 0
    body = arch.get_body(model)
    device = arch.input_device(model)
    window: dict[int, Tensor] = {}
    ctx: dict[str, Tensor] = {}

    def boundary(j: int, h: Tensor) -> None:
        window[j] = h
        if j >= k:
            a, b = window.pop(j - k).double(), h.double()  # (B, T, d)
            cos = row_cosine(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).view(
                a.shape[:2]
            )
            cos_all[j - k] += (1.0 - cos)[ctx["mask"]].sum().cpu()
            last = cos.gather(1, ctx["last"][:, None]).squeeze(1).clamp(-1.0, 1.0)  # (B,)
            ang[j - k] += (torch.arccos(last) / math.pi).sum().cpu()

    pre = [(layers[0], lambda m, args, kwargs: boundary(0, layer_input(args, kwargs)))]
    post = [
        (layers[i], lambda m, a, kw, out, i=i: boundary(i + 1, layer_output(out))) for i in range(n)
    ]
    with eval_mode(model), hooks(pre, post):
        for batch in batches:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            ctx["mask"] = mask.bool()
            ctx["last"] = mask.sum(1) - 1  # right padding: index of the last real token
            body(input_ids=ids, attention_mask=mask, use_cache=False)
            window.clear()
            n_seq += ids.shape[0]
            n_tok += int(mask.sum())
    return {
        "angular_last": (ang / max(n_seq, 1)).tolist(),
        "cosine_all": (cos_all / max(n_tok, 1)).tolist(),
    }
