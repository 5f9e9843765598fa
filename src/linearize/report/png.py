"""PNG figures (matplotlib) for papers and READMEs; the interactive twins are in ``figures.py``."""

from __future__ import annotations

from pathlib import Path

from linearize._io import atomic_write

_CURVES = (
    ("linearity", "linearity (with residual)"),
    ("linearity_no_residual", "linearity without residual"),
    ("cosine", "cosine(input, output)"),
)


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)


def linearity_png(rows: list[dict], title: str, path: Path) -> None:
    """The paper's figure: linearity with and without residual, and cosine, per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for key, label in _CURVES:
        ax.plot(x, [r[key] for r in rows], marker="o", markersize=3, label=label)
    ax.set_xlabel("layer index")
    ax.set_ylabel("score")
    ax.set_ylim(min(0.0, *(r[k] for r in rows for k, _ in _CURVES)) - 0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    _save_png(fig, path)


Series = dict[str, tuple[list, list]]  # curve name -> (x values, y values)


def curves_png(
    series: Series, path: Path, title: str, xlabel: str, ylabel: str, logy: bool = False
) -> None:
    """One line per named series, e.g. perplexity against layers removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if series:
        ax.legend(fontsize=7, ncol=2)
    _save_png(fig, path)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Sweep rows with ``ratio`` / ``ratio_ood``: perplexity ÷ the original model's."""
    orig = next((r for r in rows if r["strategy"] == "original"), {})

    def ratio(r: dict, key: str) -> float | None:
        base, value = orig.get(key), r.get(key)
        return value / base if base and value else None

    return [
        dict(r, ratio=ratio(r, "perplexity"), ratio_ood=ratio(r, "perplexity_ood")) for r in rows
    ]


def sweep_series(rows: list[dict], key: str = "perplexity") -> Series:
    """``key`` against layers removed, one series per strategy / replacement, each starting
    at the original model."""
    base = [r for r in rows if r["strategy"] == "original" and r.get(key)]
    series: Series = {}
    for r in rows:
        if r["strategy"] == "original" or not r.get(key):
            continue
        x, y = series.setdefault(
            f"{r['strategy']} / {r['replace']}", ([b["k"] for b in base], [b[key] for b in base])
        )
        x.append(r["k"])
        y.append(r[key])
    return series


def sweep_png(rows: list[dict], path: Path, model: str) -> None:
    curves_png(
        sweep_series(rows),
        path,
        f"{model}: held-out perplexity after pruning",
        "layers removed",
        "perplexity (log scale)",
        logy=True,
    )


def probe_curve(layers: list[dict]) -> tuple[list[float], list[float]]:
    """Accuracy against depth as a share of the last layer, so pruned and unpruned line up."""
    depth = max(r["layer"] for r in layers) or 1
    return [r["layer"] / depth for r in layers], [r["accuracy"] for r in layers]


def compare_png(rows: list[dict], metrics: list[str], probes: dict[str, dict], path: Path) -> None:
    """Bars per scalar metric and per-layer probing curves, one panel each, models side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if not m.endswith("best layer")]
    tasks = sorted({t for p in probes.values() for t in p})
    n = max(1, len(metrics) + len(tasks))
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), dpi=110, squeeze=False)
    labels = [r["label"] for r in rows]
    for ax, m in zip(axes.flat, metrics):
        vals = [r.get(m, float("nan")) for r in rows]
        ax.bar(range(len(rows)), vals, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), labels, rotation=20, fontsize=7)
        ax.set_title(m, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax, t in zip(axes.flat[len(metrics) :], tasks):
        for i, lab in enumerate(labels):
            if t in probes.get(lab, {}):
                ax.plot(
                    *probe_curve(probes[lab][t]), marker="o", markersize=2, color=f"C{i}", label=lab
                )
        ax.set_title(f"probe {t}: accuracy by depth", fontsize=9)
        ax.set_xlabel("layer / last layer", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(metrics) + len(tasks) :]:
        ax.axis("off")
    _save_png(fig, path)


def dynamics_png(rows: list[dict], path: Path) -> None:
    """Left: mean linearity (with and without residual) against step. Right: per-layer linearity
    without residual, one curve per checkpoint, darker = later."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    steps = [r["step"] for r in rows]
    a.plot(steps, [r["mean_linearity"] for r in rows], marker="o", label="mean linearity")
    a2 = a.twinx()
    a2.plot(
        steps,
        [r["mean_linearity_no_residual"] for r in rows],
        marker="s",
        color="C1",
        label="mean linearity without residual",
    )
    a.set_xlabel("step")
    a.set_ylabel("mean linearity", color="C0")
    a2.set_ylabel("mean linearity without residual", color="C1")
    a.grid(alpha=0.3)
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(rows):
        x = [layer["layer"] for layer in r["layers"]]
        b.plot(
            x,
            [layer["linearity_no_residual"] for layer in r["layers"]],
            marker="o",
            markersize=2,
            color=cmap(i / max(1, len(rows) - 1)),
            label=f"step {r['step']}",
        )
    b.set_xlabel("layer")
    b.set_ylabel("linearity without residual")
    b.grid(alpha=0.3)
    if len(rows) <= 12:
        b.legend(fontsize=6)
    _save_png(fig, path)


BENCH_BARS = (
    ("prefill_tok_s_ratio", "prefill"),
    ("decode_tok_s_b1_ratio", "decode, batch 1"),
    ("decode_tok_s_batch_ratio", "decode, batched"),
)


def bench_png(rows: list[dict], path: Path) -> None:
    """Throughput of each model as a ratio to the first, one group of bars per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    width = 0.8 / len(BENCH_BARS)
    for j, (key, label) in enumerate(BENCH_BARS):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r.get(key) or 0.0 for r in rows], width, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(f"throughput ÷ {rows[0]['model']}")
    ax.set_title("speed relative to the first model (median of interleaved runs)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    _save_png(fig, path)
