"""Pages of the healing runs: ``distill`` (its curve: losses and held-out perplexity against
training tokens) and ``compress`` (quality against speed for the original, the cut and the
healed model). Built from the JSON each command wrote, like every page."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from linearize.report import figures
from linearize.report.html import Page, Section, Table, figure_html, fmt

LOSS_KEYS = ("loss", "hidden", "kl", "lm")


def _num(v) -> float | None:
    """A metrics value as a number: metrics.csv gives text, and '' where nothing was taken."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _series(rows: list[dict], keys: tuple[str, ...], names: dict[str, str]) -> dict:
    out = {}
    for key in keys:
        pts = [(_num(r.get("tokens")), _num(r.get(key))) for r in rows]
        pts = [(x, y) for x, y in pts if x is not None and y is not None]
        if pts:
            out[names.get(key, key)] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def distill_page(d: dict, where: Path) -> Page:
    c, rows = d["config"], d.get("rows") or []
    ood = d.get("eval_ood_data")
    ppl_names = {"perplexity": f"in domain ({c.get('eval_data')})", "perplexity_ood": f"{ood}"}
    meta = [
        ("student", d["student"]),
        ("teacher", d["teacher"]),
        ("trains", c["train"]),
        ("text", f"{c['data']}, {d['tokens_seen']:,} tokens seen"),
        (
            "loss",
            f"hidden {c['hidden_loss']} × {c['w_hidden']}, KL × {c['w_kl']}, LM × {c['w_lm']}",
        ),
        ("steps", f"{d['steps']} of {d['total_steps']}, lr {c['lr']}"),
        ("held out", f"{c.get('eval_data') or 'none'}; out of domain: {ood or 'none'}"),
        ("elapsed", f"{d['elapsed_s']:.0f} s"),
        ("version", d.get("version", "?")),
    ]
    ppl = _series(rows, ("perplexity", "perplexity_ood"), ppl_names)
    sections = [
        Section(
            "Held-out perplexity against training tokens",
            figure=figure_html(figures.curves(ppl, "training tokens", "perplexity"))
            if ppl
            else None,
            text=[] if ppl else ["No held-out perplexity was measured (--eval '')."],
        ),
        Section(
            "Losses against training tokens",
            figure=figure_html(
                figures.curves(_series(rows, LOSS_KEYS, {}), "training tokens", "loss", logy=True)
            ),
        ),
        Section("Every step", table=Table.from_dicts(rows) if rows else None),
    ]
    return Page(
        title="Healing by distillation", source="distill.json", meta=meta, sections=sections
    )


# -- compress -------------------------------------------------------------------------------------
QUALITY_COLS = {
    "model": "model",
    "layers": "layers",
    "perplexity": "perplexity, in domain",
    "ratio": "× original",
    "perplexity_ood": "perplexity, out of domain",
    "ratio_ood": "× original (ood)",
    "recovered": "loss won back by healing",
    "recovered_ood": "won back (ood)",
    "prefill_tok_s_ratio": "prefill ×",
    "decode_tok_s_b1_ratio": "decode ×",
}


def _tradeoff(rows: list[dict]) -> go.Figure:
    """Quality (perplexity ÷ the original's) against prefill speed-up, one point per model and
    domain: up-left is worse, down-right is the goal."""
    fig = go.Figure()
    for key, name in (("ratio", "in domain"), ("ratio_ood", "out of domain")):
        pts = [r for r in rows if r.get(key) is not None and r.get("prefill_tok_s_ratio")]
        fig.add_trace(
            go.Scatter(
                x=[r["prefill_tok_s_ratio"] for r in pts],
                y=[r[key] for r in pts],
                text=[r["model"] for r in pts],
                mode="markers+text",
                textposition="top center",
                name=name,
                marker=dict(size=12),
            )
        )
    fig.update_layout(xaxis_title="prefill speed × original", yaxis_title="perplexity × original")
    return fig


def _stages(d: dict) -> Table:
    rows = [
        [name, s.get("status"), s.get("elapsed_s"), s.get("skipped", "")]
        for name, s in d["stages"].items()
    ]
    return Table(["stage", "status", "seconds", "note"], rows)


def compress_page(d: dict, where: Path) -> Page:
    st, settings = d["stages"], d["settings"]
    rows = st.get("measure", {}).get("quality") or []
    removed = st.get("prune", {}).get("removed")
    export = st.get("export", {})
    meta = [
        ("model", settings["model"]),
        ("removed", fmt(removed) if removed is not None else "not yet"),
        ("cut", f"{settings['prune']['strategy']}, replace {settings['prune']['replace']}"),
        ("healing", f"{settings['distill']['data']}, {settings['distill']['tokens']:,} tokens"),
        ("GGUF", f"{export.get('outtype')}, logit error {fmt(export.get('logit_error'))}"),
        ("version", d.get("version", "?")),
    ]
    has_speed = any(r.get("prefill_tok_s_ratio") for r in rows)
    sections = [
        Section(
            "Quality against speed",
            figure=figure_html(_tradeoff(rows)) if has_speed else None,
            table=Table.from_dicts(
                rows, [c for c in QUALITY_COLS if any(c in r for r in rows)], QUALITY_COLS
            )
            if rows
            else None,
            text=[] if rows else ["Measured in the last stage, which has not run yet."],
        ),
        Section("Stages", table=_stages(d)),
        Section(
            "Use it",
            commands=[
                'python -c "from transformers import AutoModelForCausalLM; '
                f"AutoModelForCausalLM.from_pretrained('{where.name}/model')\"",
                f"llama-cli -m {where.name}/model.gguf -p 'Once upon a time'",
                f"linearize eval {where.name}/model --out {where.name}-eval",
            ],
        ),
    ]
    return Page(
        title=f"{settings['model']} compressed",
        source="compress.json",
        meta=meta,
        sections=sections,
    )
