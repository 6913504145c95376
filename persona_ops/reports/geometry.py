"""Reports: an interactive HTML page (plotly) plus PNG figures (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from persona_ops.interp.geometry import cosine_matrix, norms
from persona_ops.io import write_text


def vector_geometry_report(vectors: Mapping[str, torch.Tensor], out_dir: str | Path, layer: int,
                           title: str = "Persona vector geometry") -> dict[str, Path]:
    """Cosine-similarity heatmap at ``layer`` and norm per layer of each named vector.

    Writes ``geometry.html`` (both plots, interactive) and ``cosine.png`` / ``norms.png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(vectors)
    sims = cosine_matrix(vectors, layer=layer).numpy()
    layer_norms = {n: norms(v).numpy() for n, v in vectors.items()}

    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"cosine similarity, layer {layer}", "norm per layer"))
    fig.add_trace(go.Heatmap(z=sims, x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu",
                             text=[[f"{v:.2f}" for v in row] for row in sims], texttemplate="%{text}"), 1, 1)
    for n, ys in layer_norms.items():
        fig.add_trace(go.Scatter(x=list(range(len(ys))), y=ys, mode="lines+markers", name=n), 1, 2)
    fig.update_layout(title=title + " (layer L = hidden_states[L])")
    fig.update_xaxes(title_text="layer", row=1, col=2)
    html = out / "geometry.html"
    write_text(html, fig.to_html(include_plotlyjs=True, full_html=True))

    f, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    im = ax.imshow(sims, vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{sims[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"cosine similarity, layer {layer}")
    f.colorbar(im)
    f.tight_layout()
    cos_png = out / "cosine.png"
    f.savefig(cos_png, dpi=120)
    plt.close(f)

    f, ax = plt.subplots(figsize=(7, 4))
    for n, ys in layer_norms.items():
        ax.plot(range(len(ys)), ys, marker="o", ms=3, label=n)
    ax.set_xlabel("layer (hidden_states index)")
    ax.set_ylabel("norm")
    ax.legend()
    f.tight_layout()
    norms_png = out / "norms.png"
    f.savefig(norms_png, dpi=120)
    plt.close(f)
    return {"html": html, "cosine": cos_png, "norms": norms_png}
