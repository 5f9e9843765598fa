"""The distillation losses: hidden-state alignment (MSE / cosine) and a chunked KL on logits
that never holds the full (tokens × vocabulary) softmax twice."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from linearize.train.distill import DistillConfig


def hidden_loss(s: Tensor, t: Tensor, mask: Tensor, kind: str) -> Tensor:
    """Mean over real tokens of the chosen per-token loss between (B, T, d) streams."""
    s, t = s.float(), t.float()
    out = s.new_zeros(())
    if kind in ("mse", "both"):
        rel = (s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)
        out = out + rel[mask].mean()
    if kind in ("cosine", "both"):
        out = out + (1.0 - F.cosine_similarity(s, t, dim=-1))[mask].mean()
    return out


def _log_probs(x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(log softmax, softmax) of x/τ in float32 from one exp pass."""
    z = x.float() / tau if tau != 1.0 else x.float()
    z = z - z.amax(-1, keepdim=True)
    e = z.exp()
    total = e.sum(-1, keepdim=True)
    return z - total.log(), e / total


class _ChunkedKL(torch.autograd.Function):
    """Σ_rows τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), a chunk of rows at a time. The forward also
    writes the gradient, τ·(p_s − p_t), which the backward only scales: no float32 copy,
    log-softmax or autograd intermediate of the whole (N, V) logits is ever held, and each
    chunk takes one exp pass per side."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, tau: float, chunk: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        grad = torch.empty_like(s)
        for i in range(0, s.shape[0], chunk):
            ls, ps = _log_probs(s[i : i + chunk], tau)
            lt, pt = _log_probs(t[i : i + chunk], tau)
            total += (pt * (lt - ls)).sum(dtype=torch.float64)
            grad[i : i + chunk] = ((ps - pt) * tau).to(s.dtype)
        ctx.save_for_backward(grad)
        return (total * tau**2).float()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


def chunked_kl(student: Tensor, teacher: Tensor, tau: float = 1.0, chunk: int = 16) -> Tensor:
    """τ²·KL(teacher ‖ student) per row, averaged over the (N, V) rows: what
    ``F.kl_div(log_softmax(s/τ), log_softmax(t/τ), log_target=True, reduction="batchmean")·τ²``
    gives, at a fraction of the memory traffic. ``chunk`` rows of a 49k vocabulary are ~3 MB,
    about what stays in cache: 16 rows measured 2.3× faster than the whole-tensor path on
    2 CPU cores, 512 rows slower than it."""
    return _ChunkedKL.apply(student, teacher.detach(), tau, chunk) / student.shape[0]


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    s_states: list[Tensor],
    t_states: list[Tensor],
    batch: dict[str, Tensor],
    c: DistillConfig,
) -> dict[str, Tensor]:
    mask = batch["attention_mask"].bool()  # (B, T)
    parts: dict[str, Tensor] = {}
    if c.w_hidden:
        losses = [
            hidden_loss(s, t.to(s.device), mask, c.hidden_loss) for s, t in zip(s_states, t_states)
        ]
        parts["hidden"] = torch.stack(losses).mean() if losses else s_states[0].new_zeros(())
    if c.w_kl:
        full = bool(mask.all())
        rows = (lambda x: x.flatten(0, 1)) if full else (lambda x: x[mask])  # (N, V), real tokens
        s_rows, t_rows = rows(student_logits), rows(teacher_logits)
        parts["kl"] = chunked_kl(s_rows, t_rows, c.temperature)
    if c.w_lm:
        ids = batch["input_ids"]
        keep = mask[:, 1:]
        parts["lm"] = F.cross_entropy(student_logits[:, :-1][keep].float(), ids[:, 1:][keep])
    total = (
        c.w_hidden * parts.get("hidden", 0.0)
        + c.w_kl * parts.get("kl", 0.0)
        + c.w_lm * parts.get("lm", 0.0)
    )
    return {"loss": total, **parts}


# -- teacher states on disk ------------------------------------------------------------------------
