"""Offload (accelerate's ``device_map`` with ``max_memory`` and a disk folder): analysis of a
model whose layers do not all fit the memory it is given scores exactly as without."""

from __future__ import annotations

import json

import pytest
from conftest import cli_run, one_line, prune_args, saved_tiny

from linearize import models


def test_max_memory_parses_per_device_and_bare_sizes():
    assert models.Offload.parse(None, None) is None
    o = models.Offload.parse("0=20GiB, cpu=60GiB", "/tmp/off")
    assert o.max_memory == {0: "20GiB", "cpu": "60GiB"} and o.folder == "/tmp/off"
    assert models.Offload.parse("300KB", None).max_memory == {"cpu": "300KB"}


def test_analysis_with_layers_offloaded_to_disk_equals_the_plain_one(tiny_dir, tmp_path):
    common = ["--tokens", 400, "--seq-len", 40, "--no-progress"]
    plain = cli_run("analyze", tiny_dir, *common, "--out", tmp_path / "a")
    assert plain.exit_code == 0, plain.output
    size = sum(p.stat().st_size for p in tiny_dir.glob("*.safetensors"))
    off = tmp_path / "offload"
    res = cli_run(
        "analyze", tiny_dir, *common, "--out", tmp_path / "b", "--device-map", "auto",
        "--max-memory", f"cpu={size // 2}", "--offload-dir", off,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    a = json.loads((tmp_path / "a" / "linearity.json").read_text())["layers"]
    rec = json.loads((tmp_path / "b" / "linearity.json").read_text())
    assert "disk" in rec["config"]["placement"], "nothing offloaded: the test would prove nothing"
    b = rec["layers"]
    for ra, rb in zip(a, b, strict=True):
        for key in ("linearity", "linearity_no_residual", "cosine", "angular_distance"):
            assert abs(ra[key] - rb[key]) <= 1e-6, (ra["layer"], key)


def _logits(path, ids):
    import torch

    from linearize import load

    model, _ = load(str(path), device="cpu")
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def six_dir(tmp_path_factory, tokenizer):
    """A saved six-layer tiny Llama: deep enough for a cut with refits on both sides."""
    return saved_tiny(tmp_path_factory.mktemp("six"), tokenizer, num_hidden_layers=6)


@pytest.mark.parametrize("replace", ["linear", "fold"])
def test_prune_with_layers_offloaded_to_disk_equals_the_plain_one(six_dir, tmp_path, replace):
    """The cut writes into offloaded layers (a bridge's target, a fold, the refits): those are
    brought onto the device for good, so the same layers go and the checkpoints compute the
    same."""
    import torch

    src = six_dir
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    common = ["--replace", replace, "--no-progress"]
    plain = cli_run(*prune_args(src, tmp_path / "a", remove=2), *common)
    assert plain.exit_code == 0, plain.output
    off = cli_run(
        *prune_args(src, tmp_path / "b", remove=2), *common, "--device-map", "auto",
        "--max-memory", f"cpu={size // 2}", "--offload-dir", tmp_path / "offload",
    )  # fmt: skip
    assert off.exit_code == 0, off.output
    a, b = (json.loads((tmp_path / d / "prune.json").read_text()) for d in "ab")
    assert "disk" in b["placement"].values(), "nothing offloaded: the test would prove nothing"
    assert a["removed"] == b["removed"] and a["reconstructed"] == b["reconstructed"]
    ids = torch.tensor([[1, 5, 9, 30, 200, 7, 7, 41]])
    torch.testing.assert_close(_logits(tmp_path / "b", ids), _logits(tmp_path / "a", ids))


def test_placement_requests_that_cannot_run_are_one_line(tiny_dir, tmp_path):
    one_line(cli_run(*prune_args(tiny_dir, tmp_path / "p"), "--max-memory", "1GB"), "--device-map")
    one_line(cli_run("analyze", tiny_dir, "--offload-dir", tmp_path / "o"), "--device-map")
    sweep = cli_run(*prune_args(tiny_dir, tmp_path / "s"), "--sweep", "0,1", "--device-map", "auto")
    one_line(sweep, "--sweep", "--device-map")
    lora = cli_run("distill", tmp_path / "s", "--train", "lora", "--device-map", "auto")
    one_line(lora, "lora", "--device-map")


def test_distill_with_layers_offloaded_to_disk_equals_the_plain_one(six_dir, tmp_path):
    """Teacher and student offloaded: the trained layers (the bridge's target and the layers
    beside the cut) are made resident, the rest computes from disk; same losses, same
    checkpoint, and a checkpoint mid-run that saves and loads."""
    import torch

    from linearize.surgery.prune import PruneConfig, prune
    from linearize.train.distill import DistillConfig, distill

    cut = PruneConfig(strategy="layers", layers=[2, 3], calib="builtin:calib", tokens=600)
    prune(str(six_dir), cut, eval_data=None, ood_data=None, out=tmp_path / "cut", device="cpu")
    size = sum(p.stat().st_size for p in (tmp_path / "cut").glob("*.safetensors"))
    base = dict(tokens=32 * 2 * 4, seq_len=32, batch_size=2, lr=1e-2, eval_data="", save_every=2)
    rows: dict[str, list] = {"a": [], "b": [], "c": []}
    place = dict(device_map="auto", max_memory=f"cpu={size // 2}", offload_dir=str(tmp_path / "o"))
    runs = [("a", {}, None, False), ("b", place, None, False)]
    runs += [("c", place, 2, False), ("c", place, None, True)]  # killed at step 2, resumed
    for name, extra, stop, resume in runs:
        res = distill(
            str(tmp_path / "cut"), DistillConfig(**base, **extra), tmp_path / name,
            device="cpu", on_step=rows[name].append, max_steps=stop, resume=resume,
        )  # fmt: skip
    assert "disk" in res["placement"].values(), "nothing offloaded: the test would prove nothing"
    for other in ("b", "c"):
        for ra, rb in zip(rows["a"], rows[other], strict=True):
            assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * max(1.0, abs(ra["loss"])), (ra, rb)
    ids = torch.tensor([[1, 5, 9, 30, 200, 7, 7, 41]])
    want = _logits(tmp_path / "a" / "final", ids)
    for other in ("b", "c"):
        torch.testing.assert_close(_logits(tmp_path / other / "final", ids), want)
