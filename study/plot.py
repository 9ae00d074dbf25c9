"""Figures: each method's fidelity/alignment frontier, and sample pictures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from . import aggregate  # noqa: E402
from .guiders import Method  # noqa: E402

COLOURS = {
    Method.CFG.value: "tab:blue",
    Method.AUTOGUIDANCE.value: "tab:orange",
    Method.TWO_WAY.value: "tab:green",
    Method.SCHEDULED.value: "tab:purple",
    Method.THREE_WAY.value: "tab:red",
}


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates, sorted by the first."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


FIDELITIES = (
    ("fidelity", "subject fidelity"),
    ("pattern_fidelity", "pattern fidelity (extra paint not penalized)"),
)


def frontier(results: dict, path: Path) -> None:
    """One column per fine-tune, one row per fidelity score.

    Every setting is a faint dot at its mean over replicates; each method's frontier of
    the means is a line, with error bars (the interval over replicates, both axes) on
    its points; thin lines are each replicate's own frontier of that method.
    """
    models = aggregate.models(results)
    fig, axes = plt.subplots(len(FIDELITIES), len(models), figsize=(5.5 * len(models), 4.6 * len(FIDELITIES)),
                             squeeze=False)
    n = len(results["replicates"])
    for row, (key, ylabel) in enumerate(FIDELITIES):
        for ax, name in zip(axes[row], models, strict=True):
            tab = aggregate.table(results, name)
            for method, colour in COLOURS.items():
                own = [s for s in tab.values() if s.method == method]
                if not own:
                    continue
                for r in range(n if n > 1 else 0):
                    front = pareto([(s.values["alignment"][r], s.values[key][r]) for s in own])
                    ax.plot(*zip(*front, strict=True), "-", color=colour, linewidth=0.6, alpha=0.3)
                means = {(s.mean("alignment"), s.mean(key)): s for s in own}
                ax.scatter(*zip(*means, strict=True), s=12, color=colour, alpha=0.35, linewidths=0)
                front = pareto(list(means))
                ax.plot(*zip(*front, strict=True), "-o", color=colour, markersize=4, label=method)
                if n > 1:
                    xerr = [means[p].estimate("alignment").half_width for p in front]
                    yerr = [means[p].estimate(key).half_width for p in front]
                    ax.errorbar(*zip(*front, strict=True), xerr=xerr, yerr=yerr, fmt="none", ecolor=colour,
                                elinewidth=0.8, capsize=2, alpha=0.7)
            ft = tab[Method.FINETUNED.value]
            ax.plot(ft.mean("alignment"), ft.mean(key), "k*", markersize=12, label="fine-tuned, no guidance")
            ax.set_title(f"{name}: new contexts, {n} replicate(s)")
            ax.set_xlabel("text alignment (background as prompted)")
            ax.set_ylabel(ylabel)
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Fidelity vs text alignment, means over replicates; bold lines: each method's Pareto frontier of "
                 "the means (bars: 95% intervals); thin lines: each replicate's frontier", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_grid(rows: dict[str, Tensor], path: Path, title: str) -> None:
    """A grid of pictures (N, 3, H, W) in [0, 1]: one row per entry of ``rows``, labelled by its key."""
    n_rows = len(rows)
    n_cols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.7 * n_cols + 2.6, 0.75 * n_rows + 0.4), squeeze=False)
    for ax_row, (label, images) in zip(axes, rows.items(), strict=True):
        for ax, image in zip(ax_row, images, strict=False):
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        ax_row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
