"""What a pruning record says about a student (which original layers it kept), which of its
boundaries align with which of the teacher's, and which of its parameters train."""

from __future__ import annotations

import torch
from torch import nn

from linearize import arch
from linearize.errors import LinearizeError
from linearize.surgery.replace import BRIDGE, runs_of


def kept_layers(student: nn.Module) -> list[int]:
    """Original indices of the student's layers, from the pruning record (or 1:1)."""
    rec = getattr(student.config, "linearize", None) or {}
    n = arch.n_layers(student)
    if not rec:
        return list(range(n))
    removed = set(rec["removed"])
    kept = [i for i in range(rec["original_layers"]) if i not in removed]
    if len(kept) != n:
        raise LinearizeError(f"the pruning record keeps {len(kept)} layers but the model has {n}")
    return kept


def boundaries(student: nn.Module, teacher: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(student module, teacher module) pairs whose *inputs* are the aligned streams."""
    kept = kept_layers(student)
    _, s_layers = arch.get_layers(student)
    _, t_layers = arch.get_layers(teacher)
    if kept[-1] >= len(t_layers):
        raise LinearizeError(
            f"the teacher has {len(t_layers)} layers; the student needs {kept[-1] + 1}"
        )
    pairs = [(s_layers[j], t_layers[i]) for j, i in enumerate(kept) if j > 0 or i > 0]
    s_norm, t_norm = arch.get_final_norm(student), arch.get_final_norm(teacher)
    if s_norm is not None and t_norm is not None:
        pairs.append((s_norm, t_norm))
    return pairs


def select_trainable_(student: nn.Module, mode: str, lora_rank: int = 16) -> nn.Module:
    """Set requires_grad for ``mode``; returns the model to train (a PEFT wrapper for lora)."""
    rec = getattr(student.config, "linearize", None) or {}
    kept = kept_layers(student)
    _, layers = arch.get_layers(student)
    runs = runs_of(rec.get("removed", []))
    # positions of kept layers right before / after a removed run
    before = [kept.index(lo - 1) for lo, _ in runs if lo - 1 in kept]
    after = [kept.index(hi) for _, hi in runs if hi in kept]
    for p in student.parameters():
        p.requires_grad_(mode == "all")
    if mode == "all":
        return student
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules="all-linear")
        student = get_peft_model(student, cfg)
    for name, p in student.named_parameters():
        if BRIDGE in name:
            p.requires_grad_(True)
    if rec.get("replace") == "fold":  # the maps live in these projections
        for pos in before:
            for p in arch.mlp_out_proj(student, pos).parameters():
                p.requires_grad_(True)
    if mode == "replacements+neighbors":
        for pos in set(before) | set(after):
            for p in layers[pos].parameters():
                p.requires_grad_(True)
    if mode == "from-cut" and (before or after):
        # the gradient reaches the first neighbour through every later layer anyway, so
        # training them all costs only their weight gradients, not another pass
        for layer in layers[min(before + after) :]:
            for p in layer.parameters():
                p.requires_grad_(True)
    if not any(p.requires_grad for p in student.parameters()):
        raise LinearizeError(
            f"--train {mode}: this student has no replacement to train "
            "(it was pruned with --replace none); use --train replacements+neighbors, all or lora"
        )
    return student


def shared_prefix(student: nn.Module, teacher: nn.Module) -> int:
    """How many leading student layers are frozen, bridge-free copies of the teacher's (same
    embedding, same weights, same dtype), up to a boundary whose teacher state the teacher
    pass records. The student's forward can start there from that state: the same loss and
    gradients for about half the student's forward after a mid-depth cut. 0 when nothing is
    shared (e.g. ``--train all`` or ``lora``)."""
    kept = kept_layers(student)
    _, s_layers = arch.get_layers(student)
    _, t_layers = arch.get_layers(teacher)
    # the teacher pass records its stream at kept layers only: stop at one (kept[p] == p)
    p = 0
    while (
        p + 1 < len(s_layers)
        and kept[p + 1] == p + 1
        and getattr(s_layers[p], BRIDGE, None) is None
        and not any(q.requires_grad for q in s_layers[p].parameters())
    ):
        p += 1
    shared = [(student.get_input_embeddings(), teacher.get_input_embeddings())]
    shared += [(s_layers[i], t_layers[i]) for i in range(p)]
    for s_mod, t_mod in shared:
        a, b = s_mod.state_dict(), t_mod.state_dict()
        if any(t.device.type == "meta" for t in (*a.values(), *b.values())):
            return 0  # offloaded: not compared, so not shared
        if a.keys() != b.keys() or any(
            a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])
            for k in a
        ):
            return 0
        if any(q.requires_grad for q in s_mod.parameters()):
            return 0
    return p


# -- the loss ------------------------------------------------------------------------------------
