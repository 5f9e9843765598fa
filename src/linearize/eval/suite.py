"""``linearize eval``: perplexity, lm-eval tasks, linear probing and an LLM judge, one model
load, one ``results.json``.

``results.json`` is the contract ``linearize compare`` reads::

    {"model": NAME, "perplexity": FLOAT, "perplexity_protocol": {...},
     "lm_eval": {TASK: {METRIC: FLOAT}}, "probe": {TASK: [{"layer", "accuracy", ...}]},
     "judge": {"n", "mean": {ASPECT: FLOAT}, "stories": [...]},
     "speed": {"prefill_tok_s", "decode_tok_s_b1", "params_m", ...}, "config": {...}}

It is rewritten atomically after every part, so when a later part fails (an unreachable judge,
an unknown task), the parts already finished stay on disk and the error is one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from linearize import models, report
from linearize._fields import option, or_none, str_list
from linearize._io import claim_output, previous_json, releases_output, write_json
from linearize._version import __version__
from linearize.errors import LinearizeError
from linearize.eval import judge, probe
from linearize.eval.bench import BenchConfig, bench_loaded
from linearize.eval.harness import run_tasks
from linearize.eval.perplexity import perplexity


@dataclass
class EvalConfig:
    ppl: str | None = option(
        "builtin:eval", "perplexity source ('' to skip)", cli=str, parse=or_none
    )
    ppl_tokens: int | None = option(32768, "perplexity tokens")
    seq_len: int = option(512, "window / max example length in tokens")
    stride: int | None = option(
        None, "sliding-window stride (default: non-overlapping; see linearize.eval.perplexity)"
    )
    tasks: list[str] = option(
        factory=list, help="lm-eval tasks, e.g. arc_easy,hellaswag", cli=str, parse=str_list
    )
    task_include: list[str] = option(
        factory=list,
        help="directory of lm-eval task YAMLs (repeatable)",
        cli=list[str] | None,
        parse=str_list,
    )
    task_limit: int | None = option(None, "examples per lm-eval task")
    probe: list[str] = option(
        factory=list,
        help="probing tasks: boolq,cb,rte,wic,copa,xstorycloze-en or FILE.jsonl",
        cli=str,
        parse=str_list,
    )
    probe_limit: int | None = option(1000, "examples per probing split")
    judge: str | None = option(
        None, "stories | tinystories | FILE of prompts (default: no judge)", cli=str, parse=or_none
    )
    judge_url: str | None = option(
        None, "OpenAI-compatible endpoint (key: $LINEARIZE_JUDGE_KEY or $OPENAI_API_KEY)"
    )
    judge_model: str | None = option(None, "model name at --judge-url, or a local HF judge model")
    judge_limit: int | None = option(None, "number of prompts")
    judge_tokens: int = option(128, "new tokens per story")
    judge_timeout: float = option(60.0, "seconds per judge request")
    judge_retries: int = option(3, "tries per judge request")
    batch_size: int = option(8, "sequences per forward pass")
    dtype: str = option("float32", "float32 | bfloat16 | float16 | auto")
    seed: int = option(0, "random seed")
    speed: bool = option(False, "also measure prefill/decode speed and memory (as linearize bench)")

    def check(self) -> None:
        if not (self.ppl or self.tasks or self.probe or self.judge or self.speed):
            raise LinearizeError(
                "nothing to evaluate: give --ppl, --tasks, --probe, --judge or --speed"
            )
        if self.judge and not (self.judge_url or self.judge_model):
            raise LinearizeError(
                "--judge needs --judge-url (an OpenAI-compatible server) or "
                "--judge-model (a local model)"
            )
        if self.judge_retries < 1 or self.judge_timeout <= 0:
            raise LinearizeError("--judge-retries must be >= 1 and --judge-timeout positive")


_PARTS = ("perplexity", "perplexity_protocol", "speed", "lm_eval", "probe", "judge")


def _finished_parts(path: Path, result: dict) -> dict:
    """The parts an earlier run of the same model and settings already wrote into ``path``."""
    old = previous_json(path)
    keys = ("model", "config")
    same = json.loads(json.dumps({k: result[k] for k in keys}))  # tuples read back as lists
    if {k: old.get(k) for k in keys} != same:
        return {}
    return {k: old[k] for k in _PARTS if k in old}


@releases_output
def evaluate_model(
    name: str | None,
    config: EvalConfig,
    out: str | Path,
    device: str = "auto",
    on_part: Callable[[str], None] | None = None,
) -> dict:
    """Run every requested part on ``name`` and write ``out/results.json``; returns it."""
    c = config
    c.check()
    out = Path(out)
    claim_output(out, model=name)
    # cheap checks first, so a bad file fails before minutes of work
    probe_tasks = [probe.load_task(p, c.probe_limit) for p in c.probe]
    prompts = judge.load_prompts(c.judge, c.judge_limit) if c.judge else []
    model, tok = models.load(name, dtype=c.dtype, device=device)
    result: dict = {
        "model": name or models.EMBEDDED_NAME,
        "config": asdict(c),
        "version": __version__,
    }
    path = out / "results.json"
    result.update(_finished_parts(path, result))  # a run killed midway resumes after its last part

    def part(label: str) -> None:
        write_json(path, result)
        report.render(path)  # the page shows what is finished, even if a later part fails
        if on_part is not None:
            on_part(label)

    write_json(path, result)
    if c.ppl and "perplexity" not in result:
        result.update(_perplexity_part(model, tok, c))
        part("perplexity")
    if c.speed and "speed" not in result:
        result["speed"] = _speed_part(name, result["model"], model, tok)
        part("speed")
    if c.tasks and "lm_eval" not in result:
        result["lm_eval"] = run_tasks(
            model, tok, c.tasks, c.task_include, c.task_limit, c.batch_size, seed=c.seed
        )
        part("lm_eval")
    for t in probe_tasks:
        if t.name not in result.setdefault("probe", {}):
            result["probe"][t.name] = probe.probe(model, tok, t, c.seq_len, c.batch_size)
            part(f"probe {t.name}")
    if c.judge and "judge" not in result:
        _judge_part(model, tok, prompts, c, device, result, path)
        part("judge")
    report.render(path)
    return result


def _perplexity_part(model, tok, c: EvalConfig) -> dict:
    torch.manual_seed(c.seed)
    return {
        "perplexity": perplexity(
            model, tok, c.ppl, c.seq_len, c.ppl_tokens, c.batch_size, stride=c.stride
        ),
        "perplexity_protocol": {
            "source": c.ppl,
            "tokens": c.ppl_tokens,
            "seq_len": c.seq_len,
            "stride": c.stride,
        },
    }


def _speed_part(name: str | None, label: str, model, tok) -> dict:
    """``linearize bench``'s row for the model already loaded (its size on disk included)."""
    where, kw = models.resolve_model(name)
    where = str(Path(where) / kw["gguf_file"]) if "gguf_file" in kw else where
    row = bench_loaded([(label, model, tok, where)], BenchConfig())[0]
    return {k: v for k, v in row.items() if not k.endswith("_ratio")}


def _judge_part(model, tok, prompts, c: EvalConfig, device: str, result: dict, path) -> None:
    """Stories from ``model``, scored by the judge; when the judge fails, the stories are kept
    in ``results.json`` before the one-line error."""
    stories = judge.generate_stories(model, tok, prompts, c.judge_tokens)
    if c.judge_url:
        ask = judge.http_judge(c.judge_url, c.judge_model or "default", c.judge_timeout)
        where = f"judge at {c.judge_url}"
    else:
        j_model, j_tok = models.load(c.judge_model, dtype=c.dtype, device=device)
        ask, where = judge.local_judge(j_model, j_tok), f"judge model '{c.judge_model}'"
    try:
        result["judge"] = judge.score_stories(ask, prompts, stories, c.judge_retries, where=where)
    except LinearizeError:
        result["judge_stories"] = [
            {"prompt": p, "story": s} for p, s in zip(prompts, stories, strict=True)
        ]
        write_json(path, result)
        raise
