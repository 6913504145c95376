"""The steering-sweep plot: trait score and coherence against the steering coefficient."""

from __future__ import annotations

from pathlib import Path


def plot_sweep(points: list[dict], path: Path, trait: str) -> Path:
    """Trait score and coherence against coefficient, one line per (kind, layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for key in sorted({(p["kind"], p["layer"]) for p in points}):
        pts = sorted((p for p in points if (p["kind"], p["layer"]) == key), key=lambda p: p["coef"])
        for ax, metric in zip(axes, ("trait_score", "coherence")):
            ax.plot([p["coef"] for p in pts], [p[metric] if p[metric] is not None else float("nan") for p in pts],
                    marker="o", label=f"{key[0]} L{key[1]}")
    for ax, title in zip(axes, (f"{trait} score", "coherence")):
        ax.set_xlabel("coefficient")
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
