"""linearize eval / compare on tiny models: perplexity protocols, probing, the judge over HTTP,
a local lm-eval task, results.json, determinism and one-line errors."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from typer.testing import CliRunner

from linearize import load
from linearize.cli import app
from linearize.data import bos_prefix
from linearize.errors import LinearizeError
from linearize.eval.judge import parse_scores, score_stories
from linearize.eval.perplexity import perplexity
from linearize.eval.probe import load_task, probe
from linearize.eval.suite import EvalConfig, evaluate_model

runner = CliRunner()


# -- a tiny OpenAI-compatible judge on 127.0.0.1 ---------------------------------------------------
def _serve(answer):
    """Start a chat-completions server whose reply content is ``answer(request_json)``."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            content = answer(body)
            raw = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(raw.encode())

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}", seen


@pytest.fixture
def good_judge():
    server, url, seen = _serve(
        lambda b: 'Sure! {"Grammar": 7, "creativity": 5, "consistency": 8, "plot": 6}'
    )
    yield url, seen
    server.shutdown()


@pytest.fixture
def garbage_judge():
    server, url, _ = _serve(lambda b: "I like this story very much.")
    yield url
    server.shutdown()


def test_parse_scores_is_lenient_but_strict_about_range():
    assert parse_scores('{"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6}') == {
        "grammar": 7.0,
        "creativity": 5.0,
        "consistency": 8.0,
        "plot": 6.0,
    }
    assert parse_scores("Grammar: 8/10\nCreativity - 6\nConsistency: 7\nPlot: 5.5")["plot"] == 5.5
    assert parse_scores("grammar 7, creativity 5, plot 6") is None  # one missing
    assert parse_scores('{"grammar": 70, "creativity": 5, "consistency": 8, "plot": 6}') is None


def test_judge_prompt_files(tmp_path):
    from linearize.eval.judge import load_prompts

    (tmp_path / "p.jsonl").write_text('{"prompt": "Once upon a time"}\n\n{"prompt": "Tom ran"}\n')
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["Once upon a time", "Tom ran"]
    (tmp_path / "q.txt").write_text("first\n\nsecond\n")
    assert load_prompts(str(tmp_path / "q.txt"), limit=1) == ["first"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(LinearizeError, match=r"bad.jsonl:2: record has no 'prompt' string"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.jsonl").write_text('["a list"]\n')
    with pytest.raises(LinearizeError, match=r"list.jsonl:1: not a JSON object"):
        load_task(str(tmp_path / "list.jsonl"))


def test_judge_over_http_and_its_failures(good_judge, garbage_judge, monkeypatch):
    from linearize.eval.judge import http_judge

    url, seen = good_judge
    monkeypatch.setenv("LINEARIZE_JUDGE_KEY", "k123")
    res = score_stories(http_judge(url, "judge-m"), ["Once", "Tom"], ["a story", "another"])
    assert res["n"] == 2 and res["mean"]["grammar"] == 7 and res["mean"]["overall"] == 6.5
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer k123"
    assert seen[0]["model"] == "judge-m" and "a story" in seen[0]["messages"][0]["content"]
    with pytest.raises(LinearizeError, match="no usable scores for story 1 after 2 tries"):
        score_stories(http_judge(garbage_judge, "m"), ["p"], ["s"], retries=2)
    with pytest.raises(LinearizeError, match="unreachable after 2 tries"):
        score_stories(
            http_judge("http://127.0.0.1:9", "m", timeout=2), ["p"], ["s"], retries=2, backoff=0.01
        )


# -- perplexity protocols --------------------------------------------------------------------------
def test_sliding_window_perplexity(tiny_dir):
    model, tok = load(str(tiny_dir), dtype="float64", device="cpu")
    plain = perplexity(model, tok, "builtin:eval", 32, 600, batch_size=4)
    # stride = a whole window (less BOS, if any): exactly the non-overlapping protocol
    body = 32 - len(bos_prefix(tok))
    assert perplexity(
        model, tok, "builtin:eval", 32, 600, batch_size=3, stride=body
    ) == pytest.approx(plain, rel=1e-9)
    overlapped = perplexity(model, tok, "builtin:eval", 32, 600, batch_size=4, stride=8)
    assert overlapped != pytest.approx(plain, rel=1e-6)
    with pytest.raises(LinearizeError, match="--stride must be between"):
        perplexity(model, tok, "builtin:eval", 32, 600, stride=body + 1)


# -- probing -----------------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _separable(tmp_path, name="sentiment.jsonl"):
    rows = [{"text": ("good " * (2 + i % 3)).strip() + " day", "label": 1} for i in range(20)]
    rows += [{"text": ("bad " * (2 + i % 3)).strip() + " day", "label": 0} for i in range(20)]
    return _write_jsonl(tmp_path / name, rows)


def test_probe_reads_a_separable_task_perfectly_at_the_embeddings(tiny_dir, tmp_path):
    model, tok = load(str(tiny_dir), dtype="float32", device="cpu")
    task = load_task(_separable(tmp_path))
    assert task.name == "sentiment" and len(task.train) == 28 and len(task.test) == 12
    rows = probe(model, tok, task)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]  # embeddings + 3 layers
    assert rows[0]["accuracy"] == 1.0 and rows[0]["majority"] == 0.5
    assert all(0.0 <= r["accuracy_last"] <= 1.0 for r in rows)
    assert probe(model, tok, task) == rows  # deterministic


def test_probe_superglue_formats_and_bad_files(tmp_path):
    boolq = [
        {
            "question": f"is it {i}",
            "passage": f"text {i}",
            "label": i % 2,
            "split": "train" if i < 8 else "validation",
        }
        for i in range(12)
    ]
    task = load_task(_write_jsonl(tmp_path / "boolq.jsonl", boolq))
    assert len(task.train) == 8 and len(task.test) == 4
    assert task.train[0] == ("text 0\nquestion: is it 0?", 0)
    cb = [{"premise": "p", "hypothesis": "h", "label": i % 3} for i in range(9)]
    assert load_task(_write_jsonl(tmp_path / "my_cb.jsonl", cb)).name == "my_cb"
    bad = [{"question": "q", "label": 1}]  # boolq without passage
    with pytest.raises(LinearizeError, match="record 1 has no field 'passage'"):
        load_task(_write_jsonl(tmp_path / "boolq.jsonl", bad))
    (tmp_path / "wic.jsonl").write_text('{"word": "w", "sentence1": "a", "label": 1}\n')
    with pytest.raises(LinearizeError, match="no field 'sentence2'"):
        load_task(str(tmp_path / "wic.jsonl"))
    with pytest.raises(LinearizeError, match="match no probing format"):
        load_task(_write_jsonl(tmp_path / "x.jsonl", [{"a": 1}]))
    with pytest.raises(LinearizeError, match="unknown probing task 'nope'"):
        load_task("nope")


# -- lm-eval -------------------------------------------------------------------------------------------
@pytest.fixture
def mc_task(tmp_path):
    """A local multiple-choice lm-eval task (jsonl + YAML), no network."""
    rows = [
        {"question": f"Question {i}: the sky is", "choices": ["blue", "green", "loud"], "label": 0}
        for i in range(6)
    ]
    data = _write_jsonl(tmp_path / "mc.jsonl", rows)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(tasks)


def test_suite_runs_every_part_writes_results_and_is_deterministic(
    tiny_dir, tmp_path, mc_task, good_judge
):
    pytest.importorskip("lm_eval")
    url, _ = good_judge
    cfg = EvalConfig(
        ppl_tokens=400,
        seq_len=32,
        tasks=["tiny_mc"],
        task_include=[mc_task],
        probe=[_separable(tmp_path)],
        judge="stories",
        judge_url=url,
        judge_limit=2,
        judge_tokens=8,
    )
    parts: list[str] = []
    res = evaluate_model(str(tiny_dir), cfg, tmp_path / "e1", "cpu", on_part=parts.append)
    assert parts == ["perplexity", "lm_eval", "probe sentiment", "judge"]
    disk = json.loads((tmp_path / "e1" / "results.json").read_text())
    assert disk == json.loads(json.dumps(res))
    assert disk["perplexity"] > 1 and 0 <= disk["lm_eval"]["tiny_mc"]["acc"] <= 1
    assert disk["probe"]["sentiment"][0]["accuracy"] == 1.0
    assert disk["judge"]["n"] == 2 and disk["judge"]["mean"]["plot"] == 6
    again = evaluate_model(str(tiny_dir), cfg, tmp_path / "e2", "cpu")
    for key in ("perplexity", "lm_eval", "probe", "judge"):
        assert again[key] == res[key], key


def test_suite_keeps_finished_parts_when_the_judge_fails(tiny_dir, tmp_path, garbage_judge):
    cfg = EvalConfig(
        ppl_tokens=300,
        seq_len=32,
        judge="stories",
        judge_url=garbage_judge,
        judge_limit=1,
        judge_tokens=4,
        judge_retries=1,
    )
    with pytest.raises(LinearizeError, match="no usable scores"):
        evaluate_model(str(tiny_dir), cfg, tmp_path / "e", "cpu")
    disk = json.loads((tmp_path / "e" / "results.json").read_text())
    assert disk["perplexity"] > 1 and "judge" not in disk and len(disk["judge_stories"]) == 1


def test_eval_and_compare_commands(tiny_dir, tmp_path, mc_task):
    pytest.importorskip("lm_eval")
    probe_file = _separable(tmp_path)
    res = runner.invoke(
        app,
        [
            "eval",
            str(tiny_dir),
            "--ppl-tokens",
            "300",
            "--seq-len",
            "32",
            "--probe",
            probe_file,
            "--tasks",
            "tiny_mc",
            "--task-include",
            mc_task,
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        [
            "eval",
            str(tiny_dir),
            "--ppl-tokens",
            "200",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]
    )
    assert res.exit_code == 0, res.output
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "perplexity" in md and "tiny_mc/acc" in md and "probe sentiment/best" in md
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "plotly" in (tmp_path / "cmp" / "compare.html").read_text().lower()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--tasks", "no_such_task"], ["unknown lm-eval task 'no_such_task'"]),
        (["--probe", "missing.jsonl"], ["not found"]),
        (["--judge", "stories"], ["--judge-url"]),
        (
            ["--judge", "stories", "--judge-url", "http://127.0.0.1:9", "--judge-timeout", "1"],
            ["unreachable"],
        ),
        (["--ppl", ""], ["nothing to evaluate"]),
    ],
)
def test_eval_bad_input_is_one_line(args, words, tiny_dir, tmp_path):
    if "--tasks" in args:
        pytest.importorskip("lm_eval")
    res = runner.invoke(
        app,
        [
            "eval",
            str(tiny_dir),
            "--ppl-tokens",
            "100",
            "--seq-len",
            "32",
            "--judge-tokens",
            "2",
            "--judge-limit",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "o"),
            *args,
        ],
    )
    assert res.exit_code == 2, res.output
    last = [ln for ln in res.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error:") and "Traceback" not in res.output
    for w in words:
        assert w in last, last


def test_compare_refuses_a_broken_results_file(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text("{broken")
    res = runner.invoke(app, ["compare", str(tmp_path / "r"), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "not a valid results.json" in res.stderr


def test_local_judge_model_runs_and_garbage_is_one_line(tiny_dir, tmp_path):
    """A local HF judge goes through the same parsing; a random model answers garbage."""
    cfg = EvalConfig(
        ppl=None,
        judge="stories",
        judge_model=str(tiny_dir),
        judge_limit=1,
        judge_tokens=4,
        judge_retries=1,
    )
    with pytest.raises(LinearizeError, match=r"judge model '.*' gave no usable scores for story 1"):
        evaluate_model(str(tiny_dir), cfg, tmp_path / "e", "cpu")
    assert len(json.loads((tmp_path / "e" / "results.json").read_text())["judge_stories"]) == 1
