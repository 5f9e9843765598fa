"""The teacher's side of distillation: its boundary states for each batch, from a forward
pass or from a cache of safetensors shards written the first time a batch is seen."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from linearize import arch, models
from linearize._cache import discard_damaged, safetensors_complete
from linearize._io import atomic_write, write_json
from linearize.arch import logits_from_final
from linearize.errors import LinearizeError, first_line
from linearize.hooks import record

if TYPE_CHECKING:
    from linearize.train.distill import DistillConfig


class TeacherCache:
    """Teacher boundary states of each micro-batch as safetensors shards, one file per batch.

    Only the boundary *inputs* are stored (the last one is the final norm's input); logits are
    recomputed from it through the teacher's norm and LM head, a d×V product instead of V floats
    per token on disk. ``manifest.json`` pins what the shards were computed from, so a cache is
    never reused for other data, another teacher or another batch layout.
    """

    def __init__(self, root: str | Path, manifest: dict, rank: int) -> None:
        self.root, self.rank = Path(root), rank
        path = self.root / "manifest.json"
        found = _read_manifest(path) if path.exists() else None
        if found is None and path.exists() and rank == 0:  # damaged: shards may be of anything
            discard_damaged(path, "manifest.json does not parse")
            for shard in self.root.glob("rank*-*.safetensors"):
                shard.unlink(missing_ok=True)
        if found is not None:
            if found != manifest:
                diff = sorted(k for k in manifest if found.get(k) != manifest[k])
                raise LinearizeError(
                    f"--cache-teacher {root} was written for other settings "
                    f"({', '.join(diff)}); use another directory"
                )
        elif rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(path, manifest)

    def _file(self, index: int) -> Path:
        return self.root / f"rank{self.rank}-{index:06d}.safetensors"

    def get(self, index: int, device) -> list[Tensor] | None:
        """Batch ``index``'s states, or None when they are not cached (a shard that does not
        read is discarded, and the teacher runs again for it)."""
        from safetensors.torch import load_file

        f = self._file(index)
        if not f.exists():
            return None
        try:
            if not safetensors_complete(f):
                raise ValueError("cut short")
            d = load_file(str(f), device=str(device))
            return [d[f"b{i}"] for i in range(len(d))]
        except Exception as e:  # safetensors' own error type, a missing key
            discard_damaged(f, first_line(e))
            return None

    def put(self, index: int, states: list[Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {f"b{i}": s.detach().contiguous().cpu() for i, s in enumerate(states)}
        atomic_write(self._file(index), lambda tmp: save_file(tensors, str(tmp)))


def _read_manifest(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


# -- the run --------------------------------------------------------------------------------------
def auto_cache_dir(manifest: dict, teacher: nn.Module, t_mods: list[nn.Module]) -> Path:
    """Where teacher states go when a batch will be seen again and no --cache-teacher was
    given: the user cache, keyed by everything the states depend on (which teacher modules
    feed the boundaries included)."""
    names = {id(m): n for n, m in teacher.named_modules()}
    key = json.dumps(
        [manifest, models.weights_digest(teacher), [names.get(id(m), "?") for m in t_mods]],
        sort_keys=True,
    )
    return models.cache_dir() / "teacher-states" / hashlib.sha1(key.encode()).hexdigest()[:16]


def teacher_cache(
    c: DistillConfig, acc, teacher: nn.Module, name: str, pairs: list, passes: float
) -> TeacherCache | None:
    """The teacher-state cache: ``--cache-teacher DIR``, or by itself in the user cache when a
    batch will be seen again (epochs, repeats), or none (``off``, or nothing repeats)."""
    manifest = {
        "teacher": name,
        "data": c.data,
        "tokens": c.tokens,
        "seq_len": c.seq_len,
        "batch_size": c.batch_size,
        "world_size": acc.num_processes,
        "boundaries": len(pairs),
        "dtype": c.teacher_dtype,
    }
    cache_dir = c.cache_teacher
    if cache_dir is None and c.epochs * passes > 1 and arch.get_final_norm(teacher) is not None:
        cache_dir = str(auto_cache_dir(manifest, teacher, [p[1] for p in pairs]))
    if not cache_dir or cache_dir == "off":
        return None
    if arch.get_final_norm(teacher) is None:
        raise LinearizeError(
            "--cache-teacher needs a model with a final norm in the architecture table"
        )
    acc.wait_for_everyone()
    return TeacherCache(cache_dir, manifest, acc.process_index)


def teacher_pass(
    teacher: nn.Module,
    t_mods: list[nn.Module],
    b: dict[str, Tensor],
    index: int,
    cache: TeacherCache | None,
    want_logits: bool,
) -> tuple[Tensor | None, list[Tensor]]:
    """Teacher logits (when the loss needs them) and boundary states for micro-batch
    ``index``, read from the cache when it holds them."""
    states = cache.get(index, b["input_ids"].device) if cache is not None else None
    with torch.no_grad():
        if states is not None:
            return (logits_from_final(teacher, states[-1]) if want_logits else None), states
        with record(inputs=t_mods) as t_in:
            if want_logits:
                logits = teacher(**b, use_cache=False).logits
            else:  # only the states are needed: the body alone, no LM head
                teacher.base_model(**b, use_cache=False)
                logits = None
    if cache is not None:
        cache.put(index, t_in.inputs)
    return logits, t_in.inputs
