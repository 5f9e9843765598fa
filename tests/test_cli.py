"""The `linearize analyze` command: outputs, --json, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import re

import pytest
import typer
from conftest import cli_run, one_line, prune_args, run_cli

from linearize._fields import choices_of
from linearize.cli import app


def test_analyze_writes_all_outputs(tiny_dir, tmp_path):
    out = tmp_path / "report"
    res = cli_run(
        "analyze", tiny_dir, "--tokens", 400, "--seq-len", 40, "--out", out, "--no-progress"
    )
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {
        "linearity.json",
        "linearity.csv",
        "linearity.png",
        "report.html",
    }
    rep = json.loads((out / "linearity.json").read_text())
    for key in ("model", "data", "tokens", "seq_len", "version", "elapsed_s", "layers"):
        assert key in rep
    assert rep["tokens"] == 400 and rep["seq_len"] == 40 and len(rep["layers"]) == 3
    assert set(rep["layers"][0]) >= {
        "layer",
        "linearity",
        "linearity_no_residual",
        "cosine",
        "block_influence",
        "angular_distance",
    }
    assert rep["config"]["batch_size"] == 8 and rep["config"]["transformers"]
    rows = list(csv.DictReader((out / "linearity.csv").open()))
    assert [int(r["layer"]) for r in rows] == [0, 1, 2]
    assert float(rows[1]["linearity"]) == pytest.approx(rep["layers"][1]["linearity"])
    assert (out / "linearity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "plotly" in html.lower() and "<script" in html and "linearity_no_residual" in html
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"


def test_a_warning_is_one_plain_line_on_stderr(tiny_dir, tmp_path):
    """Fewer tokens than dimensions warns; the user sees the message, not our source lines."""
    done = run_cli(
        "analyze",
        tiny_dir,
        "--tokens",
        32,
        "--seq-len",
        32,
        "--no-progress",
        "--out",
        tmp_path / "r",
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert any(ln.startswith("warning: only 32 tokens for hidden size") for ln in lines), lines
    assert not any(".py:" in ln or "warnings.warn" in ln for ln in lines), lines


def test_json_flag_prints_report(tiny_dir, tmp_path):
    res = cli_run(
        "analyze",
        tiny_dir,
        "--tokens",
        200,
        "--seq-len",
        40,
        "--out",
        tmp_path / "o",
        "--json",
        "--no-progress",
        "--layers",
        "0,2",
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [r["layer"] for r in rep["layers"]] == [0, 2]


@pytest.fixture
def files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    )
    return {"empty": empty, "binary": binary, "blocker": blocker, "bert": bert}


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing_model", ["not found"]),
        ("unknown_hub_id", ["cannot load model", "no-such-org/no-such-model"]),
        ("encoder_only", ["bert", "encoder-only"]),
        ("empty_data", ["empty"]),
        ("binary_data", ["binary"]),
        ("missing_data", ["not found"]),
        ("zero_tokens", ["--tokens"]),
        ("zero_seq_len", ["--seq-len"]),
        ("unwritable_out", ["cannot write"]),
        ("bad_layers", ["out of range"]),
        ("bad_massive", ["--massive"]),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(case, words, files, tiny_dir, tmp_path):
    out = tmp_path / "out"
    args = {
        "missing_model": [tmp_path / "nope"],
        "unknown_hub_id": ["no-such-org/no-such-model"],
        "encoder_only": [files["bert"]],
        "empty_data": [tiny_dir, "--data", files["empty"]],
        "binary_data": [tiny_dir, "--data", files["binary"]],
        "missing_data": [tiny_dir, "--data", tmp_path / "missing.txt"],
        "zero_tokens": [tiny_dir, "--tokens", 0],
        "zero_seq_len": [tiny_dir, "--seq-len", 0],
        "unwritable_out": [tiny_dir],
        "bad_layers": [tiny_dir, "--layers", "1,7"],
        "bad_massive": [tiny_dir, "--massive", 0.5],
    }[case]
    target = files["blocker"] / "sub" if case == "unwritable_out" else out
    res = cli_run("analyze", *args, "--out", target, "--no-progress")
    one_line(res, *words)
    assert not target.exists() and not out.exists()
    assert files["blocker"].read_text() == "x"  # the file in the way is untouched


def test_prune_command_writes_loadable_checkpoint(tiny_dir, tmp_path):
    import torch

    from linearize import arch, load

    out = tmp_path / "pruned"
    res = cli_run(
        "prune",
        tiny_dir,
        "--remove",
        1,
        "--tokens",
        400,
        "--seq-len",
        40,
        "--eval-tokens",
        200,
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "prune.json").read_text())
    assert len(rep["removed"]) == 1 and rep["perplexity_after"] > 0 and rep["original_layers"] == 3
    assert rep["strategy_reference"] == "Razzhigaev et al. 2024 (the paper)"  # from the registry
    assert "linear-greedy (Razzhigaev et al. 2024" in (out / "report.html").read_text()
    model, _ = load(str(out), device="cpu")
    assert arch.n_layers(model) == 2
    assert model.generate(
        torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0
    ).shape == (1, 6)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--remove", 3], ["all 3 layers"]),
        (["--layers", "1,1"], ["duplicate"]),
        (["--layers", "0,9"], ["out of range"]),
        (["--strategy", "nope"], ["unknown strategy"]),
        (["--replace", "fold", "--layers", "0,1"], ["cannot remove layer 0"]),
        (["--replace", "magic"], ["unknown replacement"]),
        (["--sweep", "0,3"], ["must be in 0..2"]),
        (["--sweep", "1", "--strategy", "layers"], ["does not take 'layers'"]),
    ],
)
def test_prune_bad_requests(args, words, tiny_dir, tmp_path):
    out = tmp_path / "p"
    one_line(cli_run("prune", tiny_dir, *args, "--out", out, "--tokens", 100), *words)
    assert not out.exists()


def test_prune_fold_checkpoint_loads_as_a_stock_model(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "folded"
    res = cli_run(
        "prune",
        tiny_dir,
        "--remove",
        1,
        "--replace",
        "fold",
        "--tokens",
        400,
        "--seq-len",
        40,
        "--eval-tokens",
        200,
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.linearize["replace"] == "fold"


def test_prune_sweep_command(tiny_dir, tmp_path):
    out = tmp_path / "sweep"
    res = cli_run(
        "prune",
        tiny_dir,
        "--sweep",
        "0,1",
        "--strategy",
        "linear-greedy,angular-block",
        "--replace",
        "none,fold",
        "--tokens",
        300,
        "--seq-len",
        40,
        "--eval-tokens",
        200,
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(rows) == 1 + 2 * 2 and "| angular-block | fold | 1 |" in res.output


@pytest.mark.parametrize(
    "command, config",
    [
        ("prune", "linearize.surgery.prune:PruneConfig"),
        ("distill", "linearize.train.distill:DistillConfig"),
        ("eval", "linearize.eval.suite:EvalConfig"),
        ("bench", "linearize.eval.bench:BenchConfig"),
        ("analyze", "linearize.analyze:AnalyzeConfig"),
        ("finetune", "linearize.train.finetune:FinetuneConfig"),
        ("compress", "linearize.surgery.compress:CompressConfig"),
    ],
)
def test_every_config_field_is_an_option_with_its_default(command, config):
    import dataclasses
    import importlib

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for f in dataclasses.fields(cls):
        assert f.name in params, f"{command} has no option for {name}.{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else None
        assert params[f.name].default == default, (f.name, params[f.name].default, default)
        want = f.metadata["help"]
        if "choices" in f.metadata:  # listed after the help, from the field (or its registry)
            want += ": " + " | ".join(choices_of(f))
            assert getattr(cls(), f.name) in choices_of(f)  # the default is one of them
        assert params[f.name].help == want
        assert params[f.name].rich_help_panel == f.metadata.get("panel")


def test_distill_command_passes_every_option_on(tiny_dir, tmp_path, monkeypatch):
    """... and shows the text it samples from the teacher before the first step (plain
    lines here: stderr is not a terminal)."""
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    pruned = tmp_path / "p"
    cli_run(
        "prune",
        tiny_dir,
        "--strategy",
        "layers",
        "--layers",
        "1",
        "--calib",  # so the teacher's text is first sampled by distill
        "builtin:calib",
        "--tokens",
        256,
        "--seq-len",
        32,
        "--eval",
        "",
        "--out",
        pruned,
    )
    res = cli_run(
        "distill",
        pruned,
        "--tokens",
        256,
        "--seq-len",
        32,
        "--batch-size",
        2,
        "--eval",
        "",
        "--weight-decay",
        0.25,
        "--max-grad-norm",
        0.5,
        "--data",
        "builtin:calib+self",
        "--out",
        tmp_path / "d",
    )
    assert res.exit_code == 0, res.output
    assert re.search(r"^\[\d+:\d\d\] sampling text from the model \d+/\d+$", res.stderr, re.M)
    cfg = json.loads((tmp_path / "d" / "distill.json").read_text())["config"]
    assert cfg["weight_decay"] == 0.25 and cfg["max_grad_norm"] == 0.5 and cfg["eval_data"] == ""
    assert cfg["tokens"] == 256 and cfg["teacher"] is None


def test_progress_goes_to_a_log_file_as_plain_lines(tiny_dir, tmp_path):
    """Under nohup or a scheduler stderr is a file, where a live line never shows: prune says
    each phase as it begins, as plain timestamped lines."""
    done = run_cli(*prune_args(tiny_dir, tmp_path / "p"))
    lines = done.stderr.splitlines()
    phases = [ln for ln in lines if re.match(r"^\[\d+:\d\d\] ", ln)]
    assert any("scoring" in ln for ln in phases) and any("refitting" in ln for ln in phases)
    assert len(phases) < 80 and "\x1b[" not in done.stderr  # no terminal control codes


def test_plain_lines_do_not_count_a_changing_number_as_a_new_phase(capsys):
    """A healing step's loss changes every step (one sequence a step: every ~2 s on
    SmolLM2); the log still gets a line per phase and at most one every 30 s."""
    from linearize.cli.progress import PlainLines

    now = [0.0]
    lines = PlainLines(every=30.0)
    lines.clock = lambda: now[0]
    for step in range(1, 101):  # 100 steps, 2 s apart
        now[0] = 2.0 * step
        lines(f"[2/4] heal: distilling, loss {1 / step:.4g}", step, 100)
    lines("[3/4] export", 0, 0)
    got = capsys.readouterr().err.splitlines()
    assert len(got) == 1 + 6 + 1 + 1  # first, every 30 s (to 200 s), the end, the next stage
    assert got[-1].endswith("[3/4] export") and got[-2].endswith("100/100")
