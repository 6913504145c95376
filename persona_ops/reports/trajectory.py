"""PNG plots of a checkpoint trajectory in a reference persona space, one line per model family.

Input records are the trajectory stage's (``trajectory.jsonl``): ``{checkpoint, step, family,
roles: {name: {pcs, axis}}, default, role_mean, n_pcs, ...}``. A trajectory without families
(``family`` None everywhere) is one family: the plots then show every role's line in grey, the
role mean and the default Assistant, with checkpoint labels on the x axis. With several
families each one gets a colour: its default Assistant (solid) and role mean (dashed) against
the step, and its default Assistant's PC1-PC2 path, side by side on shared axes.
"""

from __future__ import annotations

from pathlib import Path

SINGLE_COLOUR = "tab:red"


def group_by_family(records: list[dict]) -> dict[str | None, list[dict]]:
    """Records by ``family`` in order of first appearance."""
    out: dict[str | None, list[dict]] = {}
    for r in records:
        out.setdefault(r.get("family"), []).append(r)
    return out


def _x(records: list[dict]) -> list[float]:
    """Steps, or positions when a step is missing."""
    steps = [r.get("step") for r in records]
    return steps if all(s is not None for s in steps) else list(range(len(records)))


def _pc(place: dict, i: int) -> float:
    return place["pcs"][i] if len(place["pcs"]) > i else 0.0


def plot_trajectory(records: list[dict], out: Path, space=None, label_roles: list[str] | None = None,
                    ) -> list[Path]:
    """``pc_scatter.png`` (PC1-PC2 per checkpoint, roles labelled), ``axis_projection.png`` and
    ``pc_coordinates.png`` (against the checkpoint step, one line per family) and
    ``default_path.png`` (the default Assistant's PC1-PC2 path per family over the reference
    roles of ``space``). Returns the paths written (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from persona_ops.io import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    families = group_by_family(records)
    single = len(families) == 1
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {f: SINGLE_COLOUR if single else cycle[i % len(cycle)] for i, f in enumerate(families)}
    roles = sorted({n for r in records for n in r["roles"]})
    shown = set(roles if label_roles is None else label_roles)
    n_pcs = min(r["n_pcs"] for r in records)
    paths = []

    def save(fig, name: str) -> None:
        path = out / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    def title(rec: dict, i: int) -> str:
        label = rec["checkpoint"] or str(i)
        return label if single else f"{rec['family']}: {label}"

    def against_step(ax, value) -> None:
        """``value(place) -> float`` against the step: per family, or with every role when single."""
        for fam, recs in families.items():
            x = _x(recs)
            if single:
                for n in roles:
                    ax.plot(x, [value(r["roles"][n]) if n in r["roles"] else float("nan") for r in recs],
                            color="grey", lw=0.6, alpha=0.5)
                ax.plot(x, [value(r["role_mean"]) for r in recs], "k--", lw=1.5, label="role mean")
                ax.plot(x, [value(r["default"]) for r in recs], "o-", color=colour[fam], lw=2,
                        label="default Assistant")
                ax.set_xticks(x, [title(r, i) for i, r in enumerate(recs)], rotation=30, fontsize=7)
            else:
                ax.plot(x, [value(r["role_mean"]) for r in recs], "--", color=colour[fam], lw=1, alpha=0.7)
                ax.plot(x, [value(r["default"]) for r in recs], "o-", color=colour[fam], lw=2,
                        label=f"{fam}: default (role mean dashed)")
                ax.set_xlabel("step")

    # 1. PC1-PC2 scatter per checkpoint
    cols = min(4, len(records))
    rows = -(-len(records) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False, sharex=True, sharey=True)
    for i, (ax, rec) in enumerate(zip(axes.flat, records)):
        xs = [_pc(rec["roles"][n], 0) for n in rec["roles"]]
        ys = [_pc(rec["roles"][n], 1) for n in rec["roles"]]
        ax.scatter(xs, ys, s=12, c="tab:blue", alpha=0.7)
        for n, a, b in zip(rec["roles"], xs, ys):
            if n in shown:
                ax.annotate(n, (a, b), fontsize=6, alpha=0.8)
        ax.scatter([_pc(rec["default"], 0)], [_pc(rec["default"], 1)], marker="*", s=160,
                   color=colour[rec.get("family")], label="default Assistant")
        ax.set_title(title(rec, i), fontsize=9)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    for ax in list(axes.flat)[len(records):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    save(fig, "pc_scatter.png")

    # 2. axis projection against the step
    fig, ax = plt.subplots(figsize=(7, 4))
    against_step(ax, lambda place: place["axis"])
    ax.set_ylabel("projection on the Assistant Axis")
    ax.legend(fontsize=8)
    save(fig, "axis_projection.png")

    # 3. PC coordinates against the step
    fig, axes = plt.subplots(1, n_pcs, figsize=(4.2 * n_pcs, 3.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        against_step(ax, lambda place, i=i: _pc(place, i))
        ax.set_title(f"PC{i + 1}")
    axes[0][0].legend(fontsize=7)
    save(fig, "pc_coordinates.png")

    # 4. the default Assistant's path in PC1-PC2 over the reference roles, per family
    fig, ax = plt.subplots(figsize=(6, 5))
    if space is not None:
        ref = space.loadings
        ax.scatter(ref[:, 0], ref[:, 1] if ref.shape[1] > 1 else [0.0] * len(ref), s=10, c="lightgrey",
                   label="reference roles")
    for fam, recs in families.items():
        px = [_pc(r["default"], 0) for r in recs]
        py = [_pc(r["default"], 1) for r in recs]
        ax.plot(px, py, "-", color=colour[fam], lw=1, label=None if single else fam)
        if single:
            ax.scatter(px, py, c=range(len(px)), cmap="viridis", s=40, zorder=3)
        else:
            ax.scatter(px, py, color=colour[fam], s=30, zorder=3)
        for a, b, rec in zip(px, py, recs):
            ax.annotate(rec["checkpoint"], (a, b), fontsize=7)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_title("default Assistant across checkpoints" + ("" if single else ", per family"))
    ax.legend(fontsize=7)
    save(fig, "default_path.png")
    return paths
