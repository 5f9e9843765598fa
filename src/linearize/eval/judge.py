"""LLM-as-judge scoring of generated stories, as in the TinyStories paper (Eldan & Li, 2023).

The model continues each prompt (greedy decoding, so the same command gives the same
stories); a judge scores each continuation 1–10 for grammar, creativity, consistency and plot.
The judge is any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp's server; key from
``LINEARIZE_JUDGE_KEY`` or ``OPENAI_API_KEY``) or a local Hugging Face model. Answers are
parsed leniently (a JSON object, or "grammar: 7"-style lines); an answer without all four
scores in 1–10 is asked again, up to ``retries`` times, and then fails the run with one line.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from linearize import arch, data
from linearize.errors import LinearizeError, first_line

ASPECTS = ("grammar", "creativity", "consistency", "plot")

# A small fixed prompt set in the style of TinyStories' evaluation prompts (written for this
# project), so `--judge stories` works offline.
STORY_PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play in the garden with her dog,",
    "Tom had a red ball. One day, the ball rolled down the hill and into the river. Tom",
    "The old owl lived in a big tree near the farm. Every night, she",
    "Sam wanted to bake a cake for his mom's birthday, but he did not know how. He asked",
    "It was a rainy day, and Mia could not go outside. She looked at her toys and",
    "A small fish named Bubbles was afraid of the dark water at the bottom of the pond. One day,",
    "Ben and his sister found a shiny key under the bed. They wondered what it could open, so they",
    "The little train was very tired after a long day. When it reached the station,",
]

RUBRIC = (
    "The following exercise: the student is given the beginning of a story and must complete it. "
    "The beginning is:\n\n{prompt}\n\nThe student's completion is:\n\n{story}\n\n"
    "Grade the completion for grammar, creativity, consistency with the beginning, and whether "
    "the plot makes sense, each from 1 (worst) to 10 (best). Answer with only a JSON object: "
    '{{"grammar": N, "creativity": N, "consistency": N, "plot": N}}'
)


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """``stories`` (the built-in set), ``tinystories`` (HF validation stories, first two
    sentences), or a local file: ``.jsonl`` records with ``prompt``, or one prompt per line."""
    if spec == "stories":
        prompts = list(STORY_PROMPTS)
    elif spec == "tinystories":
        try:
            import datasets

            ds = datasets.load_dataset("roneneldan/TinyStories", split="validation")
        except Exception as e:
            raise LinearizeError(f"cannot load TinyStories prompts: {first_line(e)}") from None
        prompts = []
        for r in ds.select(range(min(len(ds), limit or 50))):
            sentences = re.split(r"(?<=[.!?])\s+", r["text"].strip())
            prompts.append(" ".join(sentences[:2]))
    else:
        path = Path(spec)
        if not path.is_file():
            raise LinearizeError(
                f"unknown judge prompt set '{spec}' (stories, tinystories or a file)"
            )
        if path.suffix == ".jsonl":
            prompts = []
            for lineno, rec in data.jsonl_records(path):
                if not isinstance(rec.get("prompt"), str):
                    raise LinearizeError(f"{path}:{lineno}: record has no 'prompt' string")
                prompts.append(rec["prompt"])
        else:
            prompts = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not prompts:
            raise LinearizeError(f"judge prompt file '{path}' is empty")
    return prompts[:limit] if limit else prompts


@torch.no_grad()
def generate_stories(
    model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 128
) -> list[str]:
    """Greedy continuations, one prompt at a time (no padding effects)."""
    device = arch.input_device(model)
    prefix = data.bos_prefix(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for p in prompts:
        ids = torch.tensor(
            [prefix + tokenizer(p, add_special_tokens=False)["input_ids"]], device=device
        )
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=data.pad_id_of(tokenizer),
            eos_token_id=eos,
            repetition_penalty=1.1,
        )
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


def parse_scores(text: str) -> dict[str, float] | None:
    """The four scores from a judge's answer, or None when they are not all there in 1–10."""
    found: dict[str, float] = {}
    for m in re.finditer(r"\{[^{}]*\}", text):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            low = {str(k).lower(): v for k, v in obj.items()}
            found = {a: low[a] for a in ASPECTS if isinstance(low.get(a), (int, float))}
            if len(found) == len(ASPECTS):
                break
    if len(found) < len(ASPECTS):
        for a in ASPECTS:
            m = re.search(rf"{a}\W{{0,6}}(\d+(?:\.\d+)?)", text, re.IGNORECASE)
            if m:
                found[a] = float(m.group(1))
    if len(found) < len(ASPECTS) or not all(1 <= float(v) <= 10 for v in found.values()):
        return None
    return {a: float(found[a]) for a in ASPECTS}


def http_judge(url: str, model: str, timeout: float = 60.0) -> Callable[[str], str]:
    """Ask an OpenAI-compatible ``/chat/completions`` endpoint (``url`` may omit that suffix)."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions" if endpoint.endswith("/v1") else "/v1/chat/completions"
    key = os.environ.get("LINEARIZE_JUDGE_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {
        "Content-Type": "application/json",
        **({"Authorization": f"Bearer {key}"} if key else {}),
    }

    def ask(prompt: str) -> str:
        body = json.dumps(
            {
                "model": model,
                "temperature": 0,
                "max_tokens": 200,
                "messages": [{"role": "user", "content": prompt}],
            }
        ).encode()
        req = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            reply = json.loads(r.read().decode("utf-8"))
        return str(reply["choices"][0]["message"]["content"])

    return ask


def local_judge(model: nn.Module, tokenizer, max_new_tokens: int = 80) -> Callable[[str], str]:
    """A Hugging Face model as the judge (chat template when the tokenizer has one)."""
    device = arch.input_device(model)

    @torch.no_grad()
    def ask(prompt: str) -> str:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
        else:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        ids = ids.to(device)
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=data.pad_id_of(tokenizer),
        )
        return tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)

    return ask


def score_stories(
    ask: Callable[[str], str],
    prompts: list[str],
    stories: list[str],
    retries: int = 3,
    backoff: float = 1.0,
    where: str = "judge",
) -> dict:
    """Scores of every story and their means; raises one line on an unreachable or garbled judge."""
    rows = []
    for i, (p, s) in enumerate(zip(prompts, stories)):
        scores, answer = None, ""
        for attempt in range(retries):
            try:
                answer = ask(RUBRIC.format(prompt=p, story=s))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                if attempt == retries - 1:
                    raise LinearizeError(
                        f"{where} unreachable after {retries} tries: {first_line(e)}"
                    ) from None
                time.sleep(backoff * 2**attempt)
                continue
            except (KeyError, IndexError, TypeError, ValueError) as e:
                answer = f"<malformed reply: {first_line(e)}>"
            scores = parse_scores(answer)
            if scores is not None:
                break
        if scores is None:
            shown = " ".join(answer.split())[:80]
            raise LinearizeError(
                f"{where} gave no usable scores for story {i + 1} after "
                f"{retries} tries (last answer: '{shown}')"
            )
        rows.append(
            {"prompt": p, "story": s, **scores, "overall": sum(scores.values()) / len(scores)}
        )
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in (*ASPECTS, "overall")}
    return {"n": len(rows), "mean": mean, "stories": rows}
