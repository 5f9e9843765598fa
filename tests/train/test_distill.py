"""Distillation of pruned tiny models against their originals: loss, resume, modes, errors."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import make_tiny, run_cli, saved_tiny

from linearize import arch, load
from linearize.errors import LinearizeError
from linearize.surgery.prune import PruneConfig, prune
from linearize.train.distill import DistillConfig, distill

CAL = dict(tokens=600, seq_len=48, batch_size=4)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    return saved_tiny(tmp_path_factory.mktemp("teacher"), tokenizer, num_hidden_layers=5)


def _pruned(teacher_dir, tmp_path, replace="linear", layers=(2, 3)):
    out = tmp_path / f"pruned-{replace}-{'-'.join(map(str, layers))}"
    cfg = PruneConfig(strategy="layers", layers=list(layers), replace=replace, **CAL)
    prune(str(teacher_dir), cfg, eval_data=None, out=out, device="cpu")
    return str(out)


def _cfg(**kw):
    base = dict(
        tokens=32 * 2 * 8,
        seq_len=32,
        batch_size=2,
        lr=3e-4,
        eval_tokens=256,
        eval_every=4,
        save_every=4,
        w_kl=0.5,
        train="replacements",  # the tests below check the maps alone; the default trains more
    )
    return DistillConfig(**{**base, **kw})


def _identity_bridge(student: str, tmp_path):
    """The pruned student with its bridge reset to the identity: something left to learn."""
    from linearize.surgery.replace import get_bridge, save

    model, tok = load(student, device="cpu")
    with torch.no_grad():
        bridge = get_bridge(model, 2)
        bridge.weight.copy_(torch.eye(bridge.weight.shape[0]))
        bridge.bias.zero_()
    save(model, tok, tmp_path / "reset", dict(model.config.linearize))
    return str(tmp_path / "reset")


def test_distill_lowers_the_loss_and_writes_a_loadable_checkpoint(teacher_dir, tmp_path):
    student = _identity_bridge(_pruned(teacher_dir, tmp_path), tmp_path)
    rows = []
    res = distill(
        student,
        _cfg(lr=1e-2, tokens=32 * 2 * 16),
        tmp_path / "d",
        device="cpu",
        on_step=rows.append,
    )
    assert res["steps"] == 16 and len(rows) == 16
    first = sum(r["hidden"] for r in rows[:3]) / 3
    last = sum(r["hidden"] for r in rows[-3:]) / 3
    assert last < 0.95 * first
    assert res["perplexity_after"] < res["perplexity_before"]
    model, _ = load(str(tmp_path / "d" / "final"), device="cpu")
    assert arch.n_layers(model) == 3 and model.config.linearize["distill"]["steps"] == 16
    assert (tmp_path / "d" / "metrics.csv").read_text().startswith("step,tokens")
    # only the bridge trained: the kept layers are the teacher's
    teacher, _ = load(str(teacher_dir), device="cpu")
    assert torch.equal(
        model.model.layers[0].mlp.down_proj.weight, teacher.model.layers[0].mlp.down_proj.weight
    )


def test_resume_after_a_kill_gives_the_same_next_loss(teacher_dir, tmp_path):
    student = _pruned(teacher_dir, tmp_path)
    full: list[dict] = []
    distill(student, _cfg(eval_data=""), tmp_path / "a", device="cpu", on_step=full.append)
    killed: list[dict] = []
    distill(
        student,
        _cfg(eval_data=""),
        tmp_path / "b",
        device="cpu",
        on_step=killed.append,
        max_steps=4,
    )
    assert not (tmp_path / "b" / "final").exists()
    resumed: list[dict] = []
    distill(
        student,
        _cfg(eval_data=""),
        tmp_path / "b",
        resume=True,
        device="cpu",
        on_step=resumed.append,
    )
    assert resumed[0]["step"] == 5
    assert resumed[0]["loss"] == pytest.approx(full[4]["loss"], rel=1e-6)
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "replace, train",
    [
        ("fold", "replacements"),
        ("fold", "from-cut"),
        ("linear", "lora"),
        ("linear", "replacements+neighbors"),
        ("none", "all"),
    ],
)
def test_training_modes(replace, train, teacher_dir, tmp_path):
    student = _pruned(teacher_dir, tmp_path, replace)
    rows = []
    distill(
        student,
        _cfg(train=train, hidden_loss="both", eval_data=""),
        tmp_path / "d",
        device="cpu",
        on_step=rows.append,
    )
    assert len(rows) == 8 and all(r["loss"] > 0 for r in rows)
    model, _ = load(str(tmp_path / "d" / "final"), device="cpu")
    assert arch.n_layers(model) == 3
    if replace in ("fold", "none"):  # still a stock checkpoint: plain transformers loads it
        from transformers import AutoModelForCausalLM

        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "d" / "final")
        assert stock.config.num_hidden_layers == 3 and not hasattr(stock.config, "auto_map")
    assert model.generate(
        torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0
    ).shape == (1, 6)


def test_bad_distill_requests(teacher_dir, tmp_path, tokenizer):
    student = _pruned(teacher_dir, tmp_path)
    with pytest.raises(LinearizeError, match="not a pruned checkpoint"):
        distill(str(teacher_dir), _cfg(), tmp_path / "x", device="cpu")
    with pytest.raises(LinearizeError, match="less than one optimizer step"):
        distill(student, _cfg(tokens=10), tmp_path / "x", device="cpu")
    with pytest.raises(LinearizeError, match="unknown --train"):
        distill(student, _cfg(train="some"), tmp_path / "x", device="cpu")
    with pytest.raises(LinearizeError, match="no replacement to train"):
        distill(_pruned(teacher_dir, tmp_path, "none"), _cfg(), tmp_path / "x", device="cpu")
    other = tmp_path / "other"
    make_tiny("llama", num_hidden_layers=5, vocab_size=300).save_pretrained(other)
    tok = copy.deepcopy(tokenizer)  # the session's tokenizer stays as every other test sees it
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    assert len(tokenizer) != len(tok)
    with pytest.raises(LinearizeError, match="different tokenizers"):
        distill(student, _cfg(teacher=str(other)), tmp_path / "x", device="cpu")
    assert not (tmp_path / "x" / "final").exists()


def test_cached_teacher_gives_the_same_losses(teacher_dir, tmp_path):
    """Epoch 2 reads the teacher from disk; the losses equal a run that recomputes it."""
    student = _pruned(teacher_dir, tmp_path)
    plain: list[dict] = []
    distill(
        student,
        _cfg(eval_data="", epochs=2, cache_teacher="off"),
        tmp_path / "a",
        device="cpu",
        on_step=plain.append,
    )
    cached: list[dict] = []
    cfg = _cfg(eval_data="", epochs=2, cache_teacher=str(tmp_path / "cache"))
    res = distill(student, cfg, tmp_path / "b", device="cpu", on_step=cached.append)
    assert res["steps"] == 16 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 8
    for a, b in zip(plain, cached, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    with pytest.raises(LinearizeError, match="other settings"):
        distill(
            student,
            _cfg(eval_data="", seq_len=16, cache_teacher=str(tmp_path / "cache")),
            tmp_path / "c",
            device="cpu",
        )


def test_tensorboard_events_when_installed(teacher_dir, tmp_path):
    pytest.importorskip("tensorboard")
    distill(_pruned(teacher_dir, tmp_path), _cfg(eval_data=""), tmp_path / "d", device="cpu")
    assert list((tmp_path / "d" / "tensorboard").rglob("events.out.tfevents*"))


def test_two_process_torchrun_distill(teacher_dir, tmp_path):
    """DDP on CPU (gloo): two processes train and write a checkpoint that loads."""
    student = _pruned(teacher_dir, tmp_path)
    run_cli(
        "distill",
        student,
        "--tokens",
        str(32 * 2 * 2 * 4),
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-tokens",
        "256",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--lr",
        "3e-4",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "d"),
        nproc=2,
    )
    summary = json.loads((tmp_path / "d" / "distill.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["tokens_seen"] == 32 * 2 * 2 * 4
    model, _ = load(str(tmp_path / "d" / "final"), device="cpu")
    assert arch.n_layers(model) == 3


def test_hidden_only_loss_skips_the_lm_heads_and_matches(teacher_dir, tmp_path):
    """With w_kl = w_lm = 0 neither LM head runs; the first hidden loss is unchanged."""
    student = _pruned(teacher_dir, tmp_path)
    full: list[dict] = []
    distill(student, _cfg(eval_data=""), tmp_path / "a", device="cpu", on_step=full.append)
    hidden: list[dict] = []
    distill(
        student, _cfg(eval_data="", w_kl=0.0), tmp_path / "b", device="cpu", on_step=hidden.append
    )
    assert "kl" not in hidden[0] and hidden[0]["loss"] == pytest.approx(hidden[0]["hidden"])
    assert hidden[0]["hidden"] == pytest.approx(full[0]["hidden"], rel=1e-6)


@pytest.mark.parametrize("tau, chunk", [(1.0, 7), (2.0, 256)])
def test_chunked_kl_equals_kl_div_and_its_gradient(tau, chunk):
    import torch.nn.functional as F

    from linearize.train.distill_losses import chunked_kl

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(50, 300, generator=g) * 3).requires_grad_()
    t = torch.randn(50, 300, generator=g) * 3
    old = (
        F.kl_div(
            F.log_softmax(s / tau, -1),
            F.log_softmax(t / tau, -1),
            log_target=True,
            reduction="batchmean",
        )
        * tau**2
    )
    (want,) = torch.autograd.grad(old, s)
    new = chunked_kl(s, t, tau, chunk)
    (got,) = torch.autograd.grad(new, s)
    assert float(new) == pytest.approx(float(old), abs=1e-6)
    assert float((got - want).abs().max()) <= 1e-6


def test_a_short_source_repeats_says_so_and_caches_the_teacher(teacher_dir, tmp_path, monkeypatch):
    """--tokens beyond what the source holds: the source repeats (one warning), the teacher's
    states go to the user cache by themselves, and a second run reuses them."""
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    student = _pruned(teacher_dir, tmp_path)
    src = tmp_path / "short.jsonl"
    src.write_text("".join(json.dumps({"text": f"record {i} " * 12}) + "\n" for i in range(4)))
    cfg = _cfg(data=str(src), eval_data="", tokens=32 * 2 * 6)  # 4 records of 32: 2 steps a pass
    with pytest.warns(UserWarning, match="repeating it 3×") as seen:
        first = distill(student, cfg, tmp_path / "a", device="cpu")
    assert len([w for w in seen if "repeating" in str(w.message)]) == 1
    assert first["total_steps"] == first["steps"] == 6
    shards = sorted((tmp_path / "cache" / "teacher-states").glob("*/*.safetensors"))
    assert len(shards) == 2  # one per distinct batch, not per step
    stamps = [p.stat().st_mtime_ns for p in shards]
    with pytest.warns(UserWarning, match="repeating"):
        second = distill(student, cfg, tmp_path / "b", device="cpu")
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # read back, not rewritten
    assert second["steps"] == 6


def test_the_last_pass_over_a_short_source_stops_at_tokens(teacher_dir, tmp_path, monkeypatch):
    """--tokens of one pass and a half trains one pass and a half, not two whole passes (a
    262,144-token run on a 232,777-token source trained 475,136 tokens before)."""
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    student = _pruned(teacher_dir, tmp_path)
    src = tmp_path / "short.jsonl"
    src.write_text("".join(json.dumps({"text": f"record {i} " * 12}) + "\n" for i in range(8)))
    cfg = _cfg(data=str(src), eval_data="", tokens=32 * 2 * 6)  # 8 records of 32: 4 steps a pass
    with pytest.warns(UserWarning, match="repeating it 1.5×"):
        run = distill(student, cfg, tmp_path / "a", device="cpu")
    assert run["total_steps"] == run["steps"] == 6


def test_a_source_of_empty_records_is_one_line(teacher_dir, tmp_path):
    """Records with no text give no tokens: one line, not a division by zero."""
    from conftest import cli_run, one_line

    student = _pruned(teacher_dir, tmp_path)
    src = tmp_path / "blank.jsonl"
    src.write_text(json.dumps({"text": ""}) + "\n")
    args = ["--data", src, "--tokens", 256, "--seq-len", 32, "--eval", "", "--eval-ood", ""]
    res = cli_run("distill", student, *args, "--device", "cpu", "--out", tmp_path / "d")
    one_line(res, "holds no training tokens", after_work=True)
    assert not (tmp_path / "d" / "final").exists()


def test_an_exception_inside_a_distillation_step_leaves_no_hook(
    teacher_dir, tmp_path, hook_spy, monkeypatch
):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import linearize.train.distill

    student = _pruned(teacher_dir, tmp_path)
    loaded = []  # keep student and teacher alive, so their hook tables can be read after the failure

    def keep(*args, _load=linearize.train.distill.models.load, **kwargs):
        loaded.append(_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(linearize.train.distill.models, "load", keep)
    hook_spy.handles.clear()  # the pruning run's own hooks
    hook_spy.fail_in_layer(monkeypatch, LlamaDecoderLayer, when=torch.is_grad_enabled, after=2)
    with pytest.raises(RuntimeError, match="boom"):
        distill(student, _cfg(eval_data=""), tmp_path / "d", device="cpu")
    assert len(loaded) == 2
    ours = [h for h in hook_spy.handles if not _is_bridge_hook(h)]
    assert len(ours) >= 4 and all(
        h.hooks_dict_ref() is not None for h in ours
    )  # teacher and student taps
    assert sum(h.id in h.hooks_dict_ref() for h in ours) == 0


def _is_bridge_hook(handle) -> bool:
    """The hooks a bridged checkpoint's modeling code puts on for good (the bridges)."""
    hooks = handle.hooks_dict_ref()
    return (
        hooks is not None
        and handle.id in hooks
        and "bridge" in getattr(hooks[handle.id], "__qualname__", "")
    )


def test_text_sampled_from_the_teacher_joins_the_training_data(teacher_dir, tmp_path, monkeypatch):
    """--data builtin:calib+self: half the training sequences are the teacher's own samples
    (sampled once, cached; the second run reads them back)."""
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    student = _pruned(teacher_dir, tmp_path)
    cfg = _cfg(data="builtin:calib+self", eval_data="", tokens=32 * 2 * 4)
    shown = []
    with pytest.warns(UserWarning, match="sampling 128 calibration tokens"):
        first = distill(
            student, cfg, tmp_path / "a", device="cpu", on_progress=lambda *a: shown.append(a)
        )
    assert first["steps"] == first["total_steps"] >= 4
    assert shown and {w for w, _, _ in shown} == {"sampling text from the model"}
    assert shown[-1][1] == shown[-1][2] > 0  # the sampling is shown to its end
    shown.clear()
    assert len(list((tmp_path / "cache" / "self-text").glob("*.json"))) == 2  # prune's, ours
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        second = distill(
            student, cfg, tmp_path / "b", device="cpu", on_progress=lambda *a: shown.append(a)
        )
    assert not [w for w in seen if "sampling" in str(w.message)]  # read back, not resampled
    assert not shown  # so nothing to show
    assert second["steps"] == first["steps"]
    with pytest.raises(LinearizeError, match="empty part"):
        distill(student, _cfg(data="builtin:calib+"), tmp_path / "c", device="cpu")


@pytest.mark.parametrize(
    "train, start",
    [("replacements", 1), ("replacements+neighbors", 1), ("from-cut", 1), ("all", 0)],
)
def test_the_student_starts_where_it_stops_being_the_teacher(
    teacher_dir, tmp_path, monkeypatch, train, start
):
    """Layers 0..start-1 of the student are frozen copies of the teacher's, so its forward
    starts from the teacher's state there: the same losses and weights as the whole forward."""
    import linearize.train.distill as D

    student = _pruned(teacher_dir, tmp_path)  # keeps original layers 0, 1, 4; map before 4
    starts: list[int] = []
    real = D.shared_prefix
    monkeypatch.setattr(D, "shared_prefix", lambda s, t: starts.append(real(s, t)) or starts[-1])
    fast: list[dict] = []
    cfg = _cfg(eval_data="", train=train, w_lm=0.1)
    distill(student, cfg, tmp_path / "fast", device="cpu", on_step=fast.append)
    assert starts == [start]
    monkeypatch.setattr(D, "shared_prefix", lambda s, t: 0)
    full: list[dict] = []
    distill(student, cfg, tmp_path / "full", device="cpu", on_step=full.append)
    assert len(fast) == len(full) == 8
    for a, b in zip(fast, full, strict=True):
        for k in ("loss", "hidden", "kl", "lm"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-8), (k, a, b)
    got = load(str(tmp_path / "fast" / "final"), device="cpu")[0].state_dict()
    want = load(str(tmp_path / "full" / "final"), device="cpu")[0].state_dict()
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in got) <= 1e-6


def test_no_shortcut_when_the_prefix_differs_from_the_teacher(teacher_dir, tmp_path):
    from linearize.train.student import select_trainable_, shared_prefix

    student, _ = load(_pruned(teacher_dir, tmp_path), device="cpu")
    teacher, _ = load(str(teacher_dir), device="cpu")
    select_trainable_(student, "replacements")
    assert shared_prefix(student, teacher) == 1  # layer 1's output is not a teacher boundary
    assert shared_prefix(student, copy.deepcopy(teacher).double()) == 0  # another dtype
    with torch.no_grad():
        arch.get_layers(student)[1][0].mlp.down_proj.weight.add_(1e-3)  # e.g. healed before
    assert shared_prefix(student, teacher) == 0


def test_distill_writes_its_healing_curve_in_and_out_of_domain(teacher_dir, tmp_path):
    """Held-out perplexity on both sources at step 0 and every --eval-every steps, in
    distill.json's rows and on its page; a resumed run keeps the step-0 row."""
    ood = tmp_path / "ood.txt"
    ood.write_text("The cat sat on the mat and looked at the rain. " * 400)
    student = _pruned(teacher_dir, tmp_path)
    cfg = _cfg(eval_ood=str(ood), eval_every=4, save_every=4)
    distill(student, copy.deepcopy(cfg), tmp_path / "d", device="cpu", max_steps=4)
    res = distill(student, copy.deepcopy(cfg), tmp_path / "d", resume=True, device="cpu")
    d = json.loads((tmp_path / "d" / "distill.json").read_text())
    curve = [(int(r["step"]), r.get("perplexity_ood")) for r in d["rows"] if r.get("perplexity")]
    assert [s for s, _ in curve] == [0, 4, 8] and all(float(p) > 1 for _, p in curve)
    assert d["eval_ood_data"] == str(ood)
    assert res["perplexity_before_ood"] == pytest.approx(float(curve[0][1]))
    assert res["perplexity_after_ood"] == pytest.approx(float(curve[-1][1]))
    html = (tmp_path / "d" / "report.html").read_text()
    assert "Held-out perplexity against training tokens" in html and str(ood) in html


def test_from_cut_trains_every_layer_from_the_first_neighbour_on(teacher_dir, tmp_path):
    from linearize.train.student import select_trainable_

    out = _pruned(teacher_dir, tmp_path, "fold", layers=(2,))  # keeps 0, 1, 3, 4
    trained = {}
    for mode in ("replacements+neighbors", "from-cut"):
        student, _ = load(out, device="cpu")
        select_trainable_(student, mode)
        _, layers = arch.get_layers(student)
        trained[mode] = [
            i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())
        ]
    assert trained == {"replacements+neighbors": [1, 2], "from-cut": [1, 2, 3]}
