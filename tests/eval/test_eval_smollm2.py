"""linearize eval on the real SmolLM2 and on SmolLM2 pruned by the paper's method (small sizes)."""

from __future__ import annotations

import json

import pytest
from test_eval import _separable, _serve, _write_jsonl

from linearize.eval.suite import EvalConfig, evaluate_model
from linearize.surgery.prune import PruneConfig, prune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def judge_url():
    server, url, _ = _serve(
        lambda b: '{"grammar": 6, "creativity": 4, "consistency": 5, "plot": 5}'
    )
    yield url
    server.shutdown()


def test_every_part_on_smollm2_and_its_pruned_copy(tmp_path, judge_url):
    pytest.importorskip("lm_eval")
    pruned = tmp_path / "pruned"
    prune(
        None,
        PruneConfig(
            strategy="layers",
            layers=[14, 15, 16, 17],
            replace="linear",
            tokens=1024,
            seq_len=256,
            calib="builtin:calib",  # no text sampled from the model: tiny-model tests cover 'self'
        ),
        eval_data=None,
        out=pruned,
        device="cpu",
    )
    rows = [
        {
            "question": "The capital of France is",
            "choices": [" Paris", " banana", " seven"],
            "label": 0,
        },
        {"question": "Two plus two is", "choices": [" four", " purple", " dog"], "label": 0},
    ]
    data = _write_jsonl(tmp_path / "qa.jsonl", rows)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "qa.yaml").write_text(
        f"task: qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    cfg = EvalConfig(
        ppl_tokens=2048,
        seq_len=256,
        tasks=["qa"],
        task_include=[str(tasks)],
        probe=[_separable(tmp_path)],
        judge="stories",
        judge_url=judge_url,
        judge_limit=2,
        judge_tokens=16,
    )
    base = evaluate_model(None, cfg, tmp_path / "base", "cpu")
    cut = evaluate_model(str(pruned), cfg, tmp_path / "cut", "cpu")
    assert 5 < base["perplexity"] < cut["perplexity"] < 200
    assert base["lm_eval"]["qa"]["acc"] == 1.0  # the real model knows these
    assert len(base["probe"]["sentiment"]) == 31 and len(cut["probe"]["sentiment"]) == 27
    assert max(r["accuracy"] for r in cut["probe"]["sentiment"]) == 1.0
    for res in (base, cut):
        stories = [s["story"] for s in res["judge"]["stories"]]
        assert all(len(s) > 10 for s in stories) and res["judge"]["mean"]["overall"] == 5.0
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["model"] == str(pruned)
