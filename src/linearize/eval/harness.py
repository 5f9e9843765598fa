"""lm-evaluation-harness tasks on a model already in memory (pruned checkpoints included).

``lm_eval.models.huggingface.HFLM`` accepts a model object, so the model is loaded once by
``linearize.load`` (with its linear replacements) and never re-read by the harness. Task YAML
directories given with ``include`` are registered next to the harness's own tasks, which is
how local tasks (and the tests' jsonl task) run offline.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from linearize import arch
from linearize.errors import LinearizeError, first_line


def _task_manager(include: list[str] | None):
    from lm_eval.tasks import TaskManager

    for p in include or []:
        if not Path(p).is_dir():
            raise LinearizeError(f"--task-include '{p}' is not a directory")
    return TaskManager(include_path=[str(p) for p in include] if include else None)


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    include: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict:
    """``{task: {metric: value}}`` for each task (metrics as the harness names them, minus the
    ``,none`` filter suffix). Unknown tasks fail with one line before anything runs."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise LinearizeError(
            "--tasks needs lm-evaluation-harness: pip install 'linearize[eval]'"
        ) from None
    manager = _task_manager(include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LinearizeError(
            f"unknown lm-eval task '{unknown[0]}' (see `lm-eval ls tasks`, "
            "or point --task-include at a directory of task YAMLs)"
        )
    device = str(arch.input_device(model))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=0,
        )
    except LinearizeError:
        raise
    except Exception as e:  # dataset download refused offline, malformed YAML, …
        raise LinearizeError(f"lm-eval failed: {first_line(e)}") from None
    out: dict[str, dict] = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "_stderr" not in k and k != "sample_len"
        }
    return out
