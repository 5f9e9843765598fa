"""Linear probing: how much of a task each layer's embedding makes linearly readable.

For every example, the hidden state after each layer (``output_hidden_states``: the embeddings,
then every decoder layer) is pooled two ways, the mean over real tokens and the last real
token. Per layer and pooling, a standardised logistic regression (scikit-learn, L2, C=1) is
fitted on a fixed train split and scored on the held-out split. Splits: a dataset's ``train``
and ``validation`` splits when it has both; otherwise, a local file is split 70/30 by a seeded,
stratified shuffle (seed 0), so the same file always gives the same numbers.

Formats are SuperGLUE's fields (the HF ``super_glue`` datasets and local JSONL files with the
same fields), plus xstorycloze and a generic ``text``/``label`` format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from linearize import arch, data
from linearize.errors import LinearizeError, first_line


@dataclass(frozen=True)
class ProbeFormat:
    fields: tuple[str, ...]
    text: Callable[[dict], str]
    label: Callable[[dict], int]
    hub: tuple[str, str | None] | None = None  # (dataset, config) to fetch when named


def _label(key: str, offset: int = 0) -> Callable[[dict], int]:
    return lambda r: int(r[key]) - offset


FORMATS: dict[str, ProbeFormat] = {
    "boolq": ProbeFormat(
        ("question", "passage", "label"),
        lambda r: f"{r['passage']}\nquestion: {r['question']}?",
        _label("label"),
        ("aps/super_glue", "boolq"),
    ),
    "cb": ProbeFormat(
        ("premise", "hypothesis", "label"),
        lambda r: f"{r['premise']}\nhypothesis: {r['hypothesis']}",
        _label("label"),
        ("aps/super_glue", "cb"),
    ),
    "rte": ProbeFormat(
        ("premise", "hypothesis", "label"),
        lambda r: f"{r['premise']}\nhypothesis: {r['hypothesis']}",
        _label("label"),
        ("aps/super_glue", "rte"),
    ),
    "wic": ProbeFormat(
        ("word", "sentence1", "sentence2", "label"),
        lambda r: f"{r['sentence1']}\n{r['sentence2']}\nword: {r['word']}",
        _label("label"),
        ("aps/super_glue", "wic"),
    ),
    "copa": ProbeFormat(
        ("premise", "choice1", "choice2", "question", "label"),
        lambda r: f"{r['premise']} ({r['question']})\n1: {r['choice1']}\n2: {r['choice2']}",
        _label("label"),
        ("aps/super_glue", "copa"),
    ),
    "xstorycloze-en": ProbeFormat(
        (
            "input_sentence_1",
            "input_sentence_2",
            "input_sentence_3",
            "input_sentence_4",
            "sentence_quiz1",
            "sentence_quiz2",
            "answer_right_ending",
        ),
        lambda r: (
            " ".join(r[f"input_sentence_{i}"] for i in range(1, 5))
            + f"\n1: {r['sentence_quiz1']}\n2: {r['sentence_quiz2']}"
        ),
        _label("answer_right_ending", 1),
        ("juletxara/xstory_cloze", "en"),
    ),
    "text": ProbeFormat(("text", "label"), lambda r: str(r["text"]), _label("label")),
}


@dataclass
class ProbeTask:
    name: str
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def _read_jsonl(path: Path) -> list[dict]:
    rows = [rec for _, rec in data.jsonl_records(path)]
    if not rows:
        raise LinearizeError(f"probing file '{path}' has no records")
    return rows


def _format_for(name: str, first: dict, where: str) -> ProbeFormat:
    fmt = FORMATS.get(name)
    if fmt is None:  # a file with another name: recognise it by its fields
        fmt = next((f for f in FORMATS.values() if all(k in first for k in f.fields)), None)
        if fmt is None:
            known = "; ".join(f"{k}: {', '.join(f.fields)}" for k, f in FORMATS.items())
            raise LinearizeError(
                f"{where}: fields {sorted(first)} match no probing format ({known})"
            )
    return fmt


def _examples(rows: list[dict], fmt: ProbeFormat, where: str) -> list[tuple[str, int]]:
    out = []
    for i, r in enumerate(rows):
        missing = [k for k in fmt.fields if k not in r]
        if missing:
            raise LinearizeError(f"{where}: record {i + 1} has no field '{missing[0]}'")
        out.append((fmt.text(r), fmt.label(r)))
    return out


def _split(ex: list[tuple[str, int]], seed: int = 0) -> tuple[list, list]:
    from sklearn.model_selection import train_test_split

    labels = [y for _, y in ex]
    counts = np.bincount(np.asarray(labels) - min(labels))
    stratify = labels if counts[counts > 0].min() >= 2 else None
    train, test = train_test_split(ex, test_size=0.3, random_state=seed, stratify=stratify)
    return list(train), list(test)


def load_task(spec: str, limit: int | None = None) -> ProbeTask:
    """A probing task from a local ``.jsonl`` (its name is the file stem) or a known name."""
    path = Path(spec)
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise LinearizeError(f"probing file '{spec}' not found")
        rows = _read_jsonl(path)
        fmt = _format_for(path.stem, rows[0], str(path))
        if all("split" in r for r in rows) and {"train", "validation"} <= {
            r["split"] for r in rows
        }:
            tr = _examples([r for r in rows if r["split"] == "train"], fmt, str(path))
            te = _examples([r for r in rows if r["split"] == "validation"], fmt, str(path))
        else:
            tr, te = _split(_examples(rows, fmt, str(path)))
        return ProbeTask(path.stem, tr[:limit], te[:limit])
    if spec not in FORMATS or FORMATS[spec].hub is None:
        names = ", ".join(k for k, f in FORMATS.items() if f.hub)
        raise LinearizeError(f"unknown probing task '{spec}' (known: {names}; or a local .jsonl)")
    fmt = FORMATS[spec]
    name, config = fmt.hub
    try:
        import datasets

        ds = datasets.load_dataset(name, config)
        train = ds["train"] if "train" in ds else ds[list(ds)[0]]
        test = ds["validation"] if "validation" in ds else ds["test"]
    except Exception as e:  # no network, no such dataset: one line
        raise LinearizeError(
            f"cannot load probing task '{spec}' ({name}): {first_line(e)}"
        ) from None
    tr = _examples(list(train.select(range(min(len(train), limit or len(train))))), fmt, spec)
    te = _examples(list(test.select(range(min(len(test), limit or len(test))))), fmt, spec)
    return ProbeTask(spec, tr, te)


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer, texts: list[str], max_len: int = 512, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(mean-pooled, last-token) features of shape (layers + 1, N, d), float32."""
    device = arch.input_device(model)
    prefix = data.bos_prefix(tokenizer)
    means, lasts = [], []
    for i in range(0, len(texts), batch_size):
        seqs = [
            (prefix + tokenizer(t, add_special_tokens=False)["input_ids"])[-max_len:]
            for t in texts[i : i + batch_size]
        ]
        b = data.pad_batch(seqs, data.pad_id_of(tokenizer))
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        hs = model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
        ).hidden_states
        h = torch.stack(hs).float()  # (L+1, B, T, d)
        m = mask.to(h.dtype)[None, :, :, None]
        means.append(((h * m).sum(2) / m.sum(2)).cpu())
        last = mask.sum(1) - 1
        lasts.append(h[:, torch.arange(h.shape[1]), last].cpu())
    return torch.cat(means, 1).numpy(), torch.cat(lasts, 1).numpy()


def _accuracy(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(ytr.tolist())) < 2:  # a one-class train split: the majority guess
        return float((yte == ytr[0]).mean())
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(xtr.astype(np.float64), ytr)
    return float(clf.score(xte.astype(np.float64), yte))


def probe(
    model: nn.Module, tokenizer, task: ProbeTask, max_len: int = 512, batch_size: int = 8
) -> list[dict]:
    """Per-layer held-out accuracy: ``[{"layer", "accuracy", "accuracy_last", …}]``.

    ``accuracy`` uses mean pooling, ``accuracy_last`` the last token; layer 0 is the embeddings.
    """
    if not task.train or not task.test:
        raise LinearizeError(f"probing task '{task.name}' needs examples in both splits")
    ytr = np.array([y for _, y in task.train])
    yte = np.array([y for _, y in task.test])
    m_tr, l_tr = embed(model, tokenizer, [t for t, _ in task.train], max_len, batch_size)
    m_te, l_te = embed(model, tokenizer, [t for t, _ in task.test], max_len, batch_size)
    majority = float((yte == np.bincount(ytr).argmax()).mean())
    return [
        {
            "layer": layer,
            "accuracy": _accuracy(m_tr[layer], ytr, m_te[layer], yte),
            "accuracy_last": _accuracy(l_tr[layer], ytr, l_te[layer], yte),
            "majority": majority,
            "train": len(ytr),
            "test": len(yte),
        }
        for layer in range(m_tr.shape[0])
    ]
