"""``linearize eval`` on several models with tasks built offline from the built-in text.

    python benchmarks/eval_models.py MODEL... [--out DIR] [--examples 300] [--ppl-tokens 16384]

With no network there is no SuperGLUE, ARC or judge endpoint, so this script writes two tasks
from the held-out half of Python's pydoc topics (``builtin:eval``), deterministically (seed 0):

* ``wordorder.jsonl`` (probing): a 12–24-word span of real text (label 1) or the same span with
  its words shuffled (label 0). Telling them apart needs syntax, which a layer either makes
  linearly readable or not.
* ``nextspan`` (an lm-eval multiple-choice task): given 24 words of text, which of 4 spans of
  8 words really comes next (the other three are taken from elsewhere in the text)?

Then it runs ``linearize eval`` (held-out perplexity, the two tasks, and the probe) on each
model and ``linearize compare`` over them; the Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path


def _words() -> list[str]:
    from linearize.data import _builtin_documents

    return " ".join(_builtin_documents("eval")).split()


def write_tasks(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    words = _words()
    root.mkdir(parents=True, exist_ok=True)
    probe_rows = []
    for i in range(n):
        k = rng.randint(12, 24)
        start = rng.randrange(0, len(words) - k)
        span = words[start : start + k]
        if i % 2:
            shuffled = span[:]
            while shuffled == span:
                rng.shuffle(shuffled)
            span = shuffled
        probe_rows.append({"text": " ".join(span), "label": 1 - i % 2})
    probe = root / "wordorder.jsonl"
    probe.write_text("".join(json.dumps(r) + "\n" for r in probe_rows))
    mc_rows = []
    for _ in range(n):
        start = rng.randrange(0, len(words) - 32)
        ctx, true = words[start : start + 24], words[start + 24 : start + 32]
        others = []
        while len(others) < 3:
            o = rng.randrange(0, len(words) - 8)
            if abs(o - start) > 64:
                others.append(" " + " ".join(words[o : o + 8]))
        choices = others[:]
        label = rng.randrange(4)
        choices.insert(label, " " + " ".join(true))
        mc_rows.append({"context": " ".join(ctx), "choices": choices, "label": label})
    data = root / "nextspan.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mc_rows))
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "nextspan.yaml").write_text(
        f"task: nextspan\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n"
        "  - metric: acc\n  - metric: acc_norm\n"
    )
    return probe, tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--labels", default="")
    ap.add_argument("--out", default="linearize-out/bench-eval")
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    a = ap.parse_args()
    out = Path(a.out)
    probe, tasks = write_tasks(out / "data", a.examples)
    labels = a.labels.split(",") if a.labels else [Path(m).name or m for m in a.models]
    dirs = []
    for model, label in zip(a.models, labels):
        d = out / label
        cmd = [
            sys.executable,
            "-m",
            "linearize.cli",
            "eval",
            model,
            "--ppl-tokens",
            str(a.ppl_tokens),
            "--tasks",
            "nextspan",
            "--task-include",
            str(tasks),
            "--probe",
            str(probe),
            "--device",
            "cpu",
            "--out",
            str(d),
        ]
        subprocess.run(cmd, check=True)
        dirs.append(str(d))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "linearize.cli",
            "compare",
            *dirs,
            "--labels",
            ",".join(labels),
            "--out",
            str(out / "compare"),
        ],
        check=True,
    )


if __name__ == "__main__":
    main()
