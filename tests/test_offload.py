"""Offload (accelerate's ``device_map`` with ``max_memory`` and a disk folder): analysis of a
model whose layers do not all fit the memory it is given scores exactly as without."""

from __future__ import annotations

import json

from conftest import cli_run

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
