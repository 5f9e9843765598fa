"""Hardening: an output directory that cannot be written, two runs on one --out, kills at
controlled points, NaN/overflowing models, a full disk. Each case asserts the exit code, the
single stderr line and what is (not) on disk: the rows of the README's bad-input table."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import cli_run, kill_run, make_tiny, one_line, prune_args

from linearize._io import TMP_PREFIX, strict_json

FAST = ["--tokens", "300", "--seq-len", "30"]


def readable(out: Path) -> None:
    """Every output file in ``out`` parses: JSON, PNG, safetensors (hidden temporary files of a
    killed write are not outputs; the next run on ``out`` sweeps them)."""
    for p in out.rglob("*"):
        if TMP_PREFIX in str(p):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".png":
            assert p.read_bytes()[:4] == b"\x89PNG"
        elif p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                list(f.keys())


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if TMP_PREFIX not in p.name)


def no_debris(*dirs: Path) -> None:
    for d in dirs:
        assert not [p.name for p in d.rglob(f"{TMP_PREFIX}*")], "temporary files left"


@pytest.fixture(scope="module")
def broken_dirs(tmp_path_factory, tokenizer):
    """Tiny Llamas that break: NaN in layer 1's down projection; a layer 1 whose output
    overflows float16 (finite in float32)."""
    dirs = {}
    for name, edit in (("nan", lambda w: w.fill_(float("nan"))), ("huge", lambda w: w.mul_(1e7))):
        m = make_tiny("llama")
        with torch.no_grad():
            edit(m.model.layers[1].mlp.down_proj.weight)
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[name] = d
    return dirs


# -- the output directory ----------------------------------------------------------------------
def test_uncreatable_out_fails_before_any_work(tiny_dir):
    one_line(cli_run("analyze", tiny_dir, *FAST, "--out", "/proc/linearize-x"), "cannot write to")
    assert not Path("/proc/linearize-x").exists()


@pytest.mark.parametrize("command", ["analyze", "prune", "eval"])
def test_out_in_use_by_another_run_is_refused(command, tiny_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(tmp_path / ".o.lock", os.O_RDWR | os.O_CREAT)  # another open file: another run
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242\n")
    try:
        extra = ["--ppl-tokens", 100] if command == "eval" else FAST
        one_line(cli_run(command, tiny_dir, *extra, "--out", out), "in use", "pid 4242")
    finally:
        os.close(fd)
    assert list(out.iterdir()) == []


def test_a_crashed_runs_lock_does_not_block(tiny_dir, tmp_path):
    out = tmp_path / "o"
    (tmp_path / ".o.lock").write_text("999999\n")  # its process died: the kernel dropped the flock
    res = cli_run("analyze", tiny_dir, *FAST, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert (out / "linearity.json").exists() and not (tmp_path / ".o.lock").exists()


def test_export_into_a_directory_is_refused(tmp_path):
    (tmp_path / "x.gguf").mkdir()
    one_line(cli_run("export", "--gguf", tmp_path / "x.gguf"), "is a directory")


# -- non-finite models -------------------------------------------------------------------------
def test_nan_weights_name_the_first_bad_layer(broken_dirs, tmp_path):
    res = cli_run("analyze", broken_dirs["nan"], *FAST, "--out", tmp_path / "o")
    one_line(res, "layer 1 produced non-finite hidden states")
    assert not (tmp_path / "o").exists()


def test_float16_overflow_says_to_use_another_dtype(broken_dirs, tmp_path):
    ok = cli_run("analyze", broken_dirs["huge"], *FAST, "--out", tmp_path / "f32", "--no-progress")
    assert ok.exit_code == 0, ok.output  # finite in float32
    res = cli_run(
        "analyze", broken_dirs["huge"], *FAST, "--dtype", "float16", "--out", tmp_path / "o"
    )
    one_line(res, "layer 1 produced non-finite", "float16 overflows", "bfloat16")
    assert not (tmp_path / "o").exists()


def test_nan_model_is_not_pruned_into_a_nan_checkpoint(broken_dirs, tmp_path):
    res = cli_run(*prune_args(broken_dirs["nan"], tmp_path / "p"))
    one_line(res, "non-finite", after_work=True)
    assert not (tmp_path / "p").exists()


def test_diverging_distillation_stops_before_saving(broken_dirs, tiny_dir, tmp_path):
    res = cli_run(
        "distill",
        broken_dirs["nan"],
        "--teacher",
        tiny_dir,
        "--train",
        "all",
        "--tokens",
        128,
        "--seq-len",
        32,
        "--batch-size",
        2,
        "--eval",
        "",
        "--device",
        "cpu",
        "--out",
        tmp_path / "d",
    )
    one_line(res, "loss became nan at step 1")
    assert not (tmp_path / "d" / "final").exists()


def test_json_is_strict_and_undefined_values_are_null_and_explained():
    text = strict_json(
        {"layers": [{"linearity": float("nan"), "cosine": 0.5}], "ppl": float("inf")}
    )
    obj = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert obj["layers"][0]["linearity"] is None and obj["ppl"] is None
    assert obj["undefined"]["fields"] == ["layers[0].linearity", "ppl"]


# -- a full disk -------------------------------------------------------------------------------
def test_disk_full_keeps_the_previous_outputs(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert cli_run("analyze", tiny_dir, *FAST, "--out", out, "--no-progress").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = Path.write_text

    def full(self, *a, **k):
        if "linearity.csv" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    res = cli_run(
        "analyze", tiny_dir, "--tokens", 200, "--seq-len", 20, "--out", out, "--no-progress"
    )
    one_line(res, "no space left", "linearity.csv", "earlier outputs are unchanged")
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() and after["linearity.csv"] == before["linearity.csv"]
    no_debris(out)


def test_disk_full_while_saving_a_checkpoint(tiny_dir, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mu, "safe_save_file", full)
    res = cli_run(*prune_args(tiny_dir, tmp_path / "p"))
    one_line(res, "no space left", after_work=True)
    assert not (tmp_path / "p").exists() or list((tmp_path / "p").iterdir()) == []
    no_debris(tmp_path)


# -- killed mid-run ----------------------------------------------------------------------------
def test_analyze_killed_mid_write_then_rerun(tiny_dir, tmp_path):
    out = tmp_path / "o"
    kill_run("mid:linearity.json:1", "analyze", tiny_dir, *FAST, "--out", out, "--no-progress")
    assert not (out / "linearity.json").exists()
    readable(out)
    res = cli_run("analyze", tiny_dir, *FAST, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert len(json.loads((out / "linearity.json").read_text())["layers"]) == 3
    no_debris(tmp_path)


def test_prune_killed_while_replacing_a_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "p"
    args = [
        *prune_args(tiny_dir, out),
    ]
    assert cli_run(*args).exit_code == 0
    kill_run("replace:p:1", *args)  # the new checkpoint is complete beside the old one
    if out.exists():
        readable(out)
        assert json.loads((out / "prune.json").read_text())["removed"]
    res = cli_run(*args)
    assert res.exit_code == 0, res.output
    from linearize import load

    assert load(str(out), device="cpu")[0].config.num_hidden_layers == 2
    no_debris(tmp_path)


@pytest.mark.parametrize(
    "mode, code, line",
    [
        ("term", 143, "error: stopped by signal 15 (SIGTERM)"),
        ("int", 130, "error: stopped by signal 2 (SIGINT, Ctrl-C)"),
    ],
)
def test_prune_stopped_unwinds_and_leaves_no_states(mode, code, line, tiny_dir, tmp_path):
    """SIGTERM (``kill``, a scheduler's stop) or Ctrl-C right after the pruner spilled its first
    boundary state to disk: the run unwinds through its cleanup, says so in one line, and
    leaves no spilled states, temporary files or lock behind."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = [*prune_args(tiny_dir, tmp_path / "p", 2), "--fit-target", "original", "--cache-gb", 0]
    done = kill_run(f"{mode}:linearize-states-:1", *args, code=code, TMPDIR=str(scratch))
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines[-1] == line, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not list(scratch.glob("linearize-states-*"))
    no_debris(tmp_path)
    assert cli_run(*args).exit_code == 0  # the --out lock went with it


def test_sweep_killed_then_resumed(tiny_dir, tmp_path):
    out = tmp_path / "s"
    args = [
        "prune",
        tiny_dir,
        "--sweep",
        "0,1",
        "--strategy",
        "linear-greedy",
        "--replace",
        "none",
        *FAST,
        "--calib",
        "builtin:calib",
        "--eval-tokens",
        100,
        "--eval-ood",
        "",
        "--out",
        out,
    ]
    kill_run("replace:sweep.json:2", *args)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(rows) == 1
    res = cli_run(*args)
    assert res.exit_code == 0, res.output
    again = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(again) == 2 and again[0] == rows[0]
    no_debris(tmp_path)


def killed_at_step_4_then_resumed(args: list, out: Path, summary: str) -> None:
    """Killed while step 4's checkpoint is renamed into place: step 2's is intact and
    ``--resume`` finishes the 4 steps."""
    kill_run("replace:step-4:1", *args)
    assert checkpoints(out) == ["step-2"]
    readable(out)
    res = cli_run(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert json.loads((out / summary).read_text())["steps"] == 4
    no_debris(out.parent)


def test_distill_killed_at_a_checkpoint_then_resumed(tiny_dir, tmp_path):
    student = tmp_path / "student"
    assert cli_run(*prune_args(tiny_dir, student)).exit_code == 0
    out = tmp_path / "d"
    args = [
        "distill",
        student,
        "--tokens",
        32 * 2 * 4,
        "--seq-len",
        32,
        "--batch-size",
        2,
        "--eval",
        "",
        "--save-every",
        2,
        "--device",
        "cpu",
        "--out",
        out,
    ]
    killed_at_step_4_then_resumed(args, out, "distill.json")


def test_pretrain_killed_at_a_checkpoint_then_resumed(tiny_dir, tmp_path):
    out = tmp_path / "pt"
    small = [
        "model.hidden_size=32",
        "model.num_hidden_layers=2",
        "model.num_attention_heads=4",
        "model.num_key_value_heads=2",
        "model.intermediate_size=64",
        "seq_len=32",
        "batch_size=2",
        "probe_tokens=256",
        "probe_every=2",
        "save_every=2",
    ]
    args = [
        "pretrain",
        "--config",
        "tiny",
        *small,
        "--tokenizer",
        tiny_dir,
        "--tokens",
        32 * 2 * 4,
        "--device",
        "cpu",
        "--out",
        out,
    ]
    killed_at_step_4_then_resumed(args, out, "pretrain.json")


def test_eval_killed_between_parts_then_resumed(tiny_dir, tmp_path):
    probe_file = tmp_path / "t.jsonl"
    probe_file.write_text(
        "".join(
            json.dumps(
                {
                    "text": f"{w} item {i}",
                    "label": int(w == "good"),
                    "split": "train" if i < 12 else "test",
                }
            )
            + "\n"
            for i in range(16)
            for w in ("good", "bad")
        )
    )
    out = tmp_path / "e"
    args = [
        "eval",
        tiny_dir,
        "--ppl-tokens",
        200,
        "--seq-len",
        32,
        "--probe",
        probe_file,
        "--device",
        "cpu",
        "--out",
        out,
    ]
    kill_run("replace:results.json:3", *args)  # after the perplexity part, before the probe's
    first = json.loads((out / "results.json").read_text())
    assert "perplexity" in first and "probe" not in first
    res = cli_run(*args)
    assert res.exit_code == 0, res.output
    final = json.loads((out / "results.json").read_text())
    assert final["perplexity"] == first["perplexity"] and "t" in final["probe"]
    no_debris(tmp_path)


def test_dynamics_killed_then_resumed(tiny_dir, tmp_path):
    import shutil

    out, second = tmp_path / "dyn", tmp_path / "second"
    shutil.copytree(tiny_dir, second)
    args = [
        "dynamics",
        tiny_dir,
        second,
        "--tokens",
        200,
        "--seq-len",
        20,
        "--device",
        "cpu",
        "--out",
        out,
    ]
    kill_run("replace:dynamics.json:2", *args)
    first = json.loads((out / "dynamics.json").read_text())["rows"]
    assert len(first) == 1
    readable(out)
    res = cli_run(*args)
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "dynamics.json").read_text())["rows"]
    assert len(rows) == 2 and rows[0] == first[0]
    no_debris(tmp_path)
