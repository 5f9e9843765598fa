"""Regularised pretraining, dynamics over checkpoints, and fine-tuning, on tiny sizes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import run_cli
from typer.testing import CliRunner

from linearize import load
from linearize.cli import app
from linearize.errors import LinearizeError
from linearize.train.dynamics import dynamics, expand, step_of
from linearize.train.pretrain import load_config, pretrain, regulariser

runner = CliRunner()
SMALL = [
    "model.hidden_size=32",
    "model.num_hidden_layers=3",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.intermediate_size=64",
    "seq_len=32",
    "batch_size=4",
    "probe_tokens=512",
    "probe_every=4",
    "save_every=4",
    "lr=3e-3",
]


def _cfg(tiny_dir, **kw):
    return load_config("tiny", SMALL, tokenizer=str(tiny_dir), tokens=32 * 4 * 8, **kw)


def test_regulariser_reductions():
    a = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    assert float(regulariser([a, a, a], mask, "cosine")) == pytest.approx(0.0, abs=1e-6)
    b = a + 1.0
    # mse: Σ over the 2 pairs of the mean over the 8 real tokens of ‖Δ‖² / d = 1 per pair... first pair only
    assert float(regulariser([a, b], mask, "mse")) == pytest.approx(1.0)
    assert float(regulariser([a, b], mask, "mse", normalize=False)) == pytest.approx(8.0)
    assert float(regulariser([a, -a, a], mask, "cosine")) == pytest.approx(4.0)
    assert float(regulariser([a, b], mask, "none")) == 0.0


def test_bad_configs_are_one_line(tmp_path, tiny_dir):
    with pytest.raises(LinearizeError, match="unknown config 'huge'"):
        load_config("huge")
    y = tmp_path / "c.yaml"
    y.write_text("preset: tiny\nlearning_rate: 0.1\n")
    with pytest.raises(LinearizeError, match="unknown config key 'learning_rate'"):
        load_config(str(y))
    y.write_text("model:\n  hidden_sise: 64\n")
    with pytest.raises(LinearizeError, match="unknown model key 'model.hidden_sise'"):
        load_config(str(y))
    with pytest.raises(LinearizeError, match="--reg-weight must be >= 0"):
        load_config("tiny", reg_weight=-1.0)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(LinearizeError, match="shorter than one sequence"):
        pretrain(_cfg(tiny_dir, data=str(short)), tmp_path / "o", device="cpu")
    res = runner.invoke(
        app, ["pretrain", "--config", "tiny", "--reg-weight", "-0.5", "--out", str(tmp_path / "x")]
    )
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        "error: --reg-weight must be >= 0, got -0.5"
    ]
    res = runner.invoke(app, ["pretrain", "--config", "tiny", "lr", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not KEY=VALUE" in res.stderr


def test_pretrain_writes_a_stock_checkpoint_and_logs_linearity(tiny_dir, tmp_path):
    rows: list[dict] = []
    res = pretrain(_cfg(tiny_dir, reg="cosine"), tmp_path / "p", device="cpu", on_step=rows.append)
    assert res["steps"] == 8 and len(rows) == 8
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] and all(r["reg"] > 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[0]["lm_loss"] + 0.5 * rows[0]["reg"], rel=1e-5)
    probes = [json.loads(x) for x in (tmp_path / "p" / "probe.jsonl").read_text().splitlines()]
    assert [p["step"] for p in probes] == [0, 4, 8] and len(probes[-1]["linearity"]) == 3
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "final")  # a stock checkpoint
    assert model.config.model_type == "mistral" and model.config.num_hidden_layers == 3
    assert (tmp_path / "p" / "checkpoints" / "step-4" / "model" / "config.json").exists()
    if importlib.util.find_spec("tensorboard"):  # the loop logs every command's metrics there
        assert list((tmp_path / "p" / "tensorboard").rglob("events.out.tfevents*"))


def test_reg_none_logs_the_cosine_term_without_training_on_it(tiny_dir, tmp_path):
    none: list[dict] = []
    pretrain(
        _cfg(tiny_dir, reg="none", probe_every=100),
        tmp_path / "n",
        device="cpu",
        on_step=none.append,
    )
    cos: list[dict] = []
    pretrain(
        _cfg(tiny_dir, reg="cosine", probe_every=100),
        tmp_path / "c",
        device="cpu",
        on_step=cos.append,
    )
    assert none[0]["loss"] == none[0]["lm_loss"] and none[0]["reg"] > 0
    assert none[0]["reg"] == pytest.approx(cos[0]["reg"], rel=1e-5)  # same init, same batch
    assert none[0]["lm_loss"] == pytest.approx(cos[0]["lm_loss"], rel=1e-5)
    assert none[-1]["lm_loss"] != pytest.approx(cos[-1]["lm_loss"], rel=1e-4)


def test_resume_after_a_kill_gives_the_same_next_loss(tiny_dir, tmp_path):
    full: list[dict] = []
    pretrain(_cfg(tiny_dir), tmp_path / "a", device="cpu", on_step=full.append)
    pretrain(_cfg(tiny_dir), tmp_path / "b", device="cpu", max_steps=4)
    resumed: list[dict] = []
    pretrain(_cfg(tiny_dir), tmp_path / "b", resume=True, device="cpu", on_step=resumed.append)
    assert resumed[0]["step"] == 5
    assert resumed[0]["loss"] == pytest.approx(full[4]["loss"], rel=1e-5)
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-4)
    probes = (tmp_path / "b" / "probe.jsonl").read_text().splitlines()
    assert [json.loads(p)["step"] for p in probes] == [0, 4, 8]


def test_dynamics_over_a_training_run(tiny_dir, tmp_path):
    pretrain(_cfg(tiny_dir), tmp_path / "p", device="cpu")
    series = expand([str(tiny_dir), str(tmp_path / "p")])
    assert series[1].endswith("step-4/model") and series[2].endswith("step-8/model")
    assert len(series) == 3 and step_of(series[2], 0) == 8  # final = step 8: not twice
    assert step_of(str(tmp_path / "p" / "final"), 0) == 8
    seen: list[dict] = []
    rows = dynamics(
        [str(tmp_path / "p")],
        "builtin:eval",
        512,
        32,
        4,
        tmp_path / "d",
        device="cpu",
        on_row=seen.append,
    )
    assert [r["step"] for r in rows] == [4, 8] and len(seen) == 2
    assert all(0 < r["mean_linearity"] <= 1 for r in rows)
    for name in ("dynamics.json", "dynamics.csv", "dynamics.md", "dynamics.png", "dynamics.html"):
        assert (tmp_path / "d" / name).exists()
    again = dynamics(
        [str(tmp_path / "p")],
        "builtin:eval",
        512,
        32,
        4,
        tmp_path / "d",
        device="cpu",
        on_row=seen.append,
    )
    assert len(seen) == 2 and again == json.loads(json.dumps(rows))  # resumed: nothing recomputed
    (tmp_path / "d" / "dynamics.json").write_text("{broken")  # a killed writer's leftovers: redo
    redone = dynamics(
        [str(tmp_path / "p")],
        "builtin:eval",
        512,
        32,
        4,
        tmp_path / "d",
        device="cpu",
        on_row=seen.append,
    )
    assert len(seen) == 4 and [r["step"] for r in redone] == [4, 8]
    res = runner.invoke(
        app, ["dynamics", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "e")]
    )
    assert res.exit_code == 2 and "error:" in res.stderr


def test_finetune_then_dynamics_against_the_base(tiny_dir, tmp_path):
    rows = [{"text": ("good " * (2 + i % 3)) + "day", "label": 1} for i in range(16)]
    rows += [{"text": ("bad " * (2 + i % 3)) + "day", "label": 0} for i in range(16)]
    task = tmp_path / "mood.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(
        app,
        [
            "finetune",
            str(tiny_dir),
            "--task",
            str(task),
            "--epochs",
            "2",
            "--lr",
            "1e-3",
            "--batch-size",
            "4",
            "--save-steps",
            "5",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "ft"),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert summary["steps"] == 12 and summary["accuracy_after"] == 1.0
    model, _ = load(str(tmp_path / "ft" / "final"), device="cpu")
    assert model.config.model_type == "llama"
    res = runner.invoke(
        app,
        [
            "dynamics",
            str(tiny_dir),
            str(tmp_path / "ft"),
            "--tokens",
            "512",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "d"),
        ],
    )
    assert res.exit_code == 0, res.output
    steps = [r["step"] for r in json.loads((tmp_path / "d" / "dynamics.json").read_text())["rows"]]
    assert steps[:3] == [0, 5, 10] and steps[-1] == 12  # base, checkpoint-5/10/12 (= final)


def test_two_process_torchrun_pretrain(tiny_dir, tmp_path):
    run_cli(
        "pretrain",
        "--tokenizer",
        str(tiny_dir),
        "--tokens",
        str(32 * 4 * 2 * 4),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "p"),
        *SMALL,
        nproc=2,
    )
    summary = json.loads((tmp_path / "p" / "pretrain.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert (tmp_path / "p" / "final" / "config.json").exists()


def test_hub_revisions_name_their_step():
    from linearize.models import resolve_model

    assert resolve_model("EleutherAI/pythia-160m@step1000") == (
        "EleutherAI/pythia-160m",
        {"revision": "step1000"},
    )
    assert step_of("EleutherAI/pythia-160m@step1000", 7) == 1000
    assert step_of("bigscience/bloom-560m-intermediate@global_step4000", 7) == 4000
    assert step_of("some/model", 7) == 7
    assert expand(["EleutherAI/pythia-160m@step1000"]) == ["EleutherAI/pythia-160m@step1000"]


def test_an_exception_inside_a_pretraining_step_leaves_no_hook(
    tiny_dir, tmp_path, hook_spy, monkeypatch
):
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    hook_spy.fail_in_layer(monkeypatch, MistralDecoderLayer, when=torch.is_grad_enabled, after=2)
    with pytest.raises(RuntimeError, match="boom"):
        pretrain(_cfg(tiny_dir), tmp_path / "p", device="cpu")
    assert len(hook_spy.handles) > 4 and hook_spy.left() == 0  # the step-0 probe's and the step's
