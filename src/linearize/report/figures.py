"""Interactive figures (plotly) from plain rows, for the HTML pages. The PNG twins for papers
and READMEs are in ``png.py``."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from linearize.report.png import BENCH_BARS, Series, probe_curve


def layer_curves(
    rows: list[dict],
    keys: Sequence[str],
    shown: Sequence[str],
    ylabel: str = "score",
    marks: list[tuple[int, float, str]] | None = None,
) -> go.Figure:
    """One line per score against layer index; ``shown`` are drawn, the rest start hidden (a
    click on the legend shows them). ``marks`` are (layer, y, label) points drawn on top, e.g.
    the removed layers numbered in removal order."""
    fig = go.Figure()
    x = [r["layer"] for r in rows]
    for key in keys:
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[r.get(key) for r in rows],
                mode="lines+markers",
                name=key,
                visible=True if key in shown else "legendonly",
            )
        )
    if marks:
        fig.add_trace(
            go.Scatter(
                x=[m[0] for m in marks],
                y=[m[1] for m in marks],
                text=[m[2] for m in marks],
                mode="markers+text",
                textposition="top center",
                name="removed (order)",
                marker=dict(size=13, symbol="x", color="#d62728"),
            )
        )
    fig.update_layout(xaxis_title="layer index", yaxis_title=ylabel, hovermode="x unified")
    return fig


def curves(series: Series, xlabel: str, ylabel: str, logy: bool = False) -> go.Figure:
    """One line per named series, e.g. perplexity against layers removed."""
    fig = go.Figure()
    for name, (x, y) in series.items():
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name))
    fig.update_layout(
        xaxis_title=xlabel, yaxis_title=ylabel, yaxis_type="log" if logy else "linear"
    )
    return fig


def compare(rows: list[dict], metrics: list[str], probes: dict[str, dict]) -> go.Figure:
    """A bar panel per scalar metric and a per-layer accuracy panel per probing task."""
    metrics = [m for m in metrics if not m.endswith("best layer")]
    tasks = sorted({t for p in probes.values() for t in p})
    titles = metrics + [f"probe {t}" for t in tasks]
    n = max(1, len(titles))
    cols = min(2, n)
    nrows = -(-n // cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=titles or None)
    labels = [r["label"] for r in rows]
    for i, m in enumerate(metrics):
        fig.add_trace(
            go.Bar(x=labels, y=[r.get(m) for r in rows], name=m, showlegend=False),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    for j, t in enumerate(tasks, start=len(metrics)):
        for lab in labels:
            if t in probes.get(lab, {}):
                x, y = probe_curve(probes[lab][t])
                fig.add_trace(
                    go.Scatter(x=x, y=y, mode="lines+markers", name=f"{lab} · {t}"),
                    row=j // cols + 1,
                    col=j % cols + 1,
                )
    fig.update_layout(height=max(440, 300 * nrows))
    return fig


def dynamics_means(rows: list[dict]) -> go.Figure:
    steps = [r["step"] for r in rows]
    fig = go.Figure()
    for key in ("mean_linearity", "mean_linearity_no_residual"):
        fig.add_trace(go.Scatter(x=steps, y=[r[key] for r in rows], mode="lines+markers", name=key))
    fig.update_layout(xaxis_title="step", yaxis_title="mean over layers")
    return fig


def dynamics_layers(rows: list[dict], key: str = "linearity_no_residual") -> go.Figure:
    """Per-layer ``key``, one curve per checkpoint."""
    fig = go.Figure()
    for r in rows:
        fig.add_trace(
            go.Scatter(
                x=[layer["layer"] for layer in r["layers"]],
                y=[layer[key] for layer in r["layers"]],
                mode="lines+markers",
                name=f"step {r['step']}",
            )
        )
    fig.update_layout(xaxis_title="layer index", yaxis_title=key)
    return fig


def bench(rows: list[dict]) -> go.Figure:
    """Throughput of each model as a ratio to the first, grouped per model."""
    fig = go.Figure()
    for key, label in BENCH_BARS:
        fig.add_trace(
            go.Bar(x=[r["model"] for r in rows], y=[r.get(key) for r in rows], name=label)
        )
    fig.update_layout(yaxis_title=f"throughput ÷ {rows[0]['model']}", barmode="group")
    return fig
