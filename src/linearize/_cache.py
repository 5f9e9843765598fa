"""Cache entries that are checked, never trusted: a file that does not read whole is thrown
away (with one warning) and made again."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path


def safetensors_complete(path: Path) -> bool:
    """Whether the safetensors file at ``path`` holds all the bytes its header promises: a
    file cut short (a full disk, a killed copy) is found without reading its tensors."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    return size == 8 + n + max(ends, default=0)


def discard_damaged(path: Path, why: str) -> None:
    """Remove a damaged cache entry (a file or a directory), with one warning line: caches are
    rebuilt, never trusted when they do not read."""
    warnings.warn(f"the cached {path} is damaged ({why}): discarded and made again", stacklevel=3)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
