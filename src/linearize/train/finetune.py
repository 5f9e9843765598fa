"""``linearize finetune``: brief supervised fine-tuning on a classification task, with the HF
Trainer, writing checkpoints that ``linearize dynamics`` compares with the base model.

The paper's Table 1 fine-tunes on BoolQ, CB and MultiRC and finds linearity rises. Here the
task stays a language-modelling problem, so every checkpoint is a stock causal LM that
``analyze`` and ``eval`` read: each example becomes ``TEXT\\nanswer:`` followed by a verbaliser
(`` no``/`` yes`` for two classes, `` 0``, `` 1``, … otherwise), and the loss is the
cross-entropy of the verbaliser tokens only. Accuracy (the verbaliser with the higher
log-probability at the answer position) is measured on the held-out split before and after.
Examples and splits come from ``linearize.eval.probe.load_task`` (SuperGLUE fields or text/label).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from linearize import arch, data, models
from linearize._fields import option
from linearize._io import atomic_dir, claim_output, releases_output, write_json
from linearize.errors import LinearizeError
from linearize.eval.probe import load_task


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Every field is an option of ``linearize finetune``."""

    epochs: float = option(1.0, "passes over the train split")
    lr: float = option(2e-5, "learning rate")
    batch_size: int = option(8, "examples per step")
    max_len: int = option(256, "tokens per example")
    warmup: float = option(0.05, "share of steps spent warming up")
    save_steps: int = option(50, "steps between checkpoints")
    limit: int | None = option(2000, "examples per split")
    seed: int = option(0, "random seed")

    def check(self) -> None:
        if self.batch_size < 1 or self.epochs <= 0 or self.lr <= 0:
            raise LinearizeError("--batch-size, --epochs and --lr must be positive")


def verbalizers(n_classes: int) -> list[str]:
    return [" no", " yes"] if n_classes <= 2 else [f" {i}" for i in range(n_classes)]


def _encode(tok, text: str, target: str, max_len: int) -> dict:
    prefix = data.bos_prefix(tok)
    t_ids = tok(target, add_special_tokens=False)["input_ids"]
    p_ids = tok(f"{text}\nanswer:", add_special_tokens=False)["input_ids"]
    p_ids = p_ids[-max(1, max_len - len(prefix) - len(t_ids)) :]  # keep the end of long texts
    ids = prefix + p_ids + t_ids
    return {"input_ids": ids, "labels": [-100] * (len(ids) - len(t_ids)) + t_ids}


def _collate(pad_id: int):
    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        b = data.pad_batch([r["input_ids"] for r in rows], pad_id)
        labels = torch.full_like(b["input_ids"], -100)
        for i, r in enumerate(rows):
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        return {**b, "labels": labels}

    return collate


@torch.no_grad()
def accuracy(model, tok, examples: list[tuple[str, int]], n_classes: int, max_len: int) -> float:
    """Share of examples whose true verbaliser has the highest log-probability."""
    model.eval()
    device = arch.input_device(model)
    first = [tok(v, add_special_tokens=False)["input_ids"][0] for v in verbalizers(n_classes)]
    right = 0
    for text, label in examples:
        ids = _encode(tok, text, "", max_len)["input_ids"]
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
        right += int(int(torch.argmax(logits[first])) == label)
    return right / max(1, len(examples))


def _training_args(c: FinetuneConfig, out: Path, cpu: bool):
    from transformers import TrainingArguments

    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio)
    ratio = (
        "warmup_ratio"
        if "warmup_ratio" in inspect.signature(TrainingArguments).parameters
        else "warmup_steps"
    )
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=c.epochs,
        per_device_train_batch_size=c.batch_size,
        learning_rate=c.lr,
        **{ratio: c.warmup},
        lr_scheduler_type="linear",
        weight_decay=0.0,
        save_strategy="steps",
        save_steps=c.save_steps,
        logging_steps=10,
        report_to=[],
        seed=c.seed,
        data_seed=c.seed,
        use_cpu=cpu,
        bf16=not cpu and torch.cuda.is_bf16_supported(),
        remove_unused_columns=False,
        disable_tqdm=False,
    )


@releases_output
def finetune(
    model_name: str | None,
    task_file: str,
    config: FinetuneConfig | None = None,
    out: str | Path = "linearize-out/finetune",
    resume: bool = False,
    device: str = "auto",
) -> dict:
    """Fine-tune ``model_name`` on ``task_file``; writes Trainer checkpoints, ``final`` and
    ``finetune.json`` (accuracy before/after) in ``out``."""
    from transformers import Trainer

    c = config or FinetuneConfig()
    c.check()
    out = Path(out)
    claim_output(out, model=model_name)
    task = load_task(task_file, c.limit)
    n_classes = max(y for _, y in task.train + task.test) + 1
    if n_classes < 2:
        raise LinearizeError(f"task '{task.name}' has a single class")
    model, tok = models.load(model_name, dtype="float32", device=device, savable=True)
    verbs = verbalizers(n_classes)
    before = accuracy(model, tok, task.test, n_classes, c.max_len)
    train = [_encode(tok, t, verbs[y], c.max_len) for t, y in task.train]
    args = _training_args(c, out, cpu=str(model.device) == "cpu")
    model.train()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tok,
        data_collator=_collate(data.pad_id_of(tok)),
    )  # tokenizer saved in each checkpoint
    has_ckpt = any(out.glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if resume and has_ckpt else None)
    after = accuracy(model, tok, task.test, n_classes, c.max_len)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_dir(out / "final", write)
    summary = {
        "model": model_name or models.EMBEDDED_NAME,
        "task": task.name,
        "config": asdict(c),
        "train_examples": len(task.train),
        "test_examples": len(task.test),
        "accuracy_before": before,
        "accuracy_after": after,
        "steps": int(result.global_step),
        "train_loss": float(result.training_loss),
    }
    write_json(out / "finetune.json", summary)
    return summary
