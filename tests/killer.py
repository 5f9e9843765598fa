"""Run the ``linearize`` CLI and SIGKILL it at a controlled point (for the hardening tests).

    python tests/killer.py MODE:NAME:N linearize-args...

MODE ``replace``: die the N-th time a file or directory named NAME is renamed into place
(its temporary copy is complete, the old one still stands); ``after``: die right after that
rename (the new one stands, nothing after it ran). MODE ``popen``: die right after starting
the N-th child process whose command line contains NAME, writing its pid to $KILLER_PID_FILE
first. MODE ``call``: die at the N-th call of the function NAME (``package.module.function``). MODE ``mid``: die halfway
through the N-th write of a text file whose temporary name contains NAME. MODE ``term``
(``int``): send itself SIGTERM (SIGINT) after the N-th safetensors file whose path contains
NAME is saved, so the run may unwind.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

mode, name, nth = (
    sys.argv[1].rsplit(":", 2) if sys.argv[1].startswith("call:") else sys.argv[1].split(":")
)
seen = 0
if mode == "int":
    # as at a terminal: a background job (CI, nohup, `cmd &`) starts with SIGINT ignored,
    # which Python keeps, and then the signal this mode sends would do nothing
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _count(hit: bool) -> bool:
    global seen
    seen += hit
    return hit and seen == int(nth)


real_replace = os.replace


def replace(src, dst, *a, **k):
    if mode == "replace" and _count(Path(dst).name == name):
        os.kill(os.getpid(), signal.SIGKILL)
    done = real_replace(src, dst, *a, **k)
    if mode == "after" and _count(Path(dst).name == name):
        os.kill(os.getpid(), signal.SIGKILL)
    return done


real_write_text = Path.write_text


def write_text(self, text, *a, **k):
    if mode == "mid" and _count(name in self.name):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write_text(self, text, *a, **k)


import safetensors.torch  # noqa: E402

real_save_file = safetensors.torch.save_file


def save_file(tensors, filename, *a, **k):
    real_save_file(tensors, filename, *a, **k)
    if mode in ("term", "int") and _count(name in str(filename)):
        os.kill(os.getpid(), signal.SIGTERM if mode == "term" else signal.SIGINT)


import subprocess  # noqa: E402

RealPopen = subprocess.Popen


class Popen(RealPopen):
    def __init__(self, args, *a, **k):
        super().__init__(args, *a, **k)
        if mode == "popen" and _count(name in " ".join(map(str, args))):
            Path(os.environ["KILLER_PID_FILE"]).write_text(str(self.pid))
            os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace
subprocess.Popen = Popen
if mode == "call":
    import importlib

    module_name, _, attr = name.rpartition(".")
    module = importlib.import_module(module_name)
    real_fn = getattr(module, attr)

    def dying(*a, **k):
        if _count(True):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_fn(*a, **k)

    setattr(module, attr, dying)
Path.write_text = write_text
safetensors.torch.save_file = save_file

from linearize.cli import app  # noqa: E402 (after the patches, on purpose)

app(sys.argv[2:])
