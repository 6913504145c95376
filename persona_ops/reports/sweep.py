"""The steering-sweep plot: trait score and coherence against the steering coefficient."""

from __future__ import annotations

from pathlib import Path

from persona_ops.io import atomic_path


def plot_sweep(points: list[dict], path: Path, trait: str) -> Path:
    """Mean trait score and coherence against the coefficient, one line per (kind, layer), with
    each point's bootstrap interval as a band (``points``: ``evaluate.summarize`` entries)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = float("nan")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for key in sorted({(p["kind"], p["layer"]) for p in points}):
        pts = sorted((p for p in points if (p["kind"], p["layer"]) == key), key=lambda p: p["coef"])
        coefs = [p["coef"] for p in pts]
        for ax, metric in zip(axes, ("trait", "coherence")):
            line, = ax.plot(coefs, [nan if p[metric] is None else p[metric] for p in pts], marker="o",
                            label=f"{key[0]} L{key[1]}")
            cis = [p.get(f"{metric}_ci") or (nan, nan) for p in pts]
            ax.fill_between(coefs, [c[0] for c in cis], [c[1] for c in cis], color=line.get_color(), alpha=0.15)
    for ax, title in zip(axes, (f"{trait} score", "coherence")):
        ax.set_xlabel("coefficient")
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
