"""Persona space and the Assistant Axis (Lu et al. 2026): role vectors, PCA, axis, projections.

Shapes and conventions:

- Activations of one role are ``[n, rows, hidden]``: one mean over response tokens per
  sample, one row per captured layer. ``layers[i]`` is the ``hidden_states`` index of row
  ``i`` (0 = embedding output; see ``persona_ops.interp.vectors.LAYER_CONVENTION``); when all
  layers are captured, ``layers = range(num_layers + 1)`` and row ``L`` is layer ``L``.
- A role vector is the mean of a role's samples judged to fully play the role (score >= the
  threshold, 3 on the 0-3 scale, i.e. score == 3); the default vector is the mean of *all*
  default-Assistant samples.
- The persona space is a PCA (scikit-learn) of the mean-centred role vectors at one layer.
  **Sign convention**: PC1 is flipped so the default Assistant has a positive PC1
  coordinate; the other PCs keep scikit-learn's deterministic sign.
- The Assistant Axis is ``mean(default) - mean(roles)`` per layer, unnormalised, so it
  points *toward* the Assistant. Projections onto it use the unit axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from persona_ops.errors import InputError

VARIANCE_LEVELS = (0.7, 0.8, 0.9)
_FORMAT = "persona-space/1"


# --- vectors ------------------------------------------------------------------

def role_vector(acts: torch.Tensor, scores: Sequence[float | None], threshold: float = 3.0,
                min_count: int = 1) -> torch.Tensor | None:
    """Mean of the samples whose score is ``>= threshold`` (``None`` scores never count).

    ``acts`` is ``[n, rows, hidden]`` (or ``[n, hidden]``) with one row per sample in the
    order of ``scores``. Returns ``[rows, hidden]`` float32, or ``None`` when fewer than
    ``min_count`` samples qualify (the role is dropped).
    """
    if acts.shape[0] != len(scores):
        raise InputError(f"role_vector: {acts.shape[0]} activation rows but {len(scores)} scores")
    keep = [i for i, s in enumerate(scores) if s is not None and s >= threshold]
    if len(keep) < max(min_count, 1):
        return None
    return acts[keep].float().mean(0)


def default_vector(acts: torch.Tensor) -> torch.Tensor:
    """Mean of all default-Assistant samples: ``[n, rows, hidden] -> [rows, hidden]`` float32."""
    if acts.shape[0] == 0:
        raise InputError("default_vector: no default-Assistant samples")
    return acts.float().mean(0)


def count_passing(scores: Sequence[float | None], threshold: float = 3.0) -> int:
    """How many scores reach the threshold (what ``role_vector`` compares with ``min_count``)."""
    return sum(s is not None and s >= threshold for s in scores)


def middle_layer(num_layers: int) -> int:
    """The default layer: ``num_layers // 2`` in the ``hidden_states`` convention.

    assistant-axis' default ``model.layers[n // 2]`` is our ``n // 2 + 1``.
    """
    return num_layers // 2


# --- the space ----------------------------------------------------------------

@dataclass
class PersonaSpace:
    """A PCA of role vectors at ``layer`` plus the Assistant Axis at every captured layer.

    ``components`` ``[K, H]`` are unit rows (``K = min(R - 1, H)``: the rank of ``R`` centred
    roles); ``loadings`` ``[R, K]`` are the roles' PC
    coordinates; ``axis`` and ``default`` are ``[rows, H]`` over ``layers``;
    ``axis_pc1_cos`` ``[rows]`` is cos(axis, PC1) with PC1 fit separately at each layer.
    """

    roles: list[str]
    layer: int
    layers: list[int]
    role_vectors: torch.Tensor  # [R, H] at `layer`
    default: torch.Tensor  # [rows, H]
    axis: torch.Tensor  # [rows, H], unnormalised, points toward the Assistant
    mean: torch.Tensor  # [H] role mean at `layer` (the PCA centre)
    components: torch.Tensor  # [K, H]
    explained_variance: torch.Tensor  # [K]
    explained_variance_ratio: torch.Tensor  # [K]
    loadings: torch.Tensor  # [R, K]
    axis_pc1_cos: torch.Tensor  # [rows]
    metadata: dict = field(default_factory=dict)

    def row(self, layer: int | None = None) -> int:
        """Row index of a ``hidden_states`` layer in ``axis`` / ``default``."""
        layer = self.layer if layer is None else layer
        if layer not in self.layers:
            raise InputError(f"layer {layer} is not in the persona space (layers {self.layers})")
        return self.layers.index(layer)

    def pcs_for(self, fraction: float) -> int:
        """Fewest PCs whose cumulative explained variance reaches ``fraction``."""
        cum = np.cumsum(self.explained_variance_ratio.double().numpy())
        return int(min(np.searchsorted(cum, fraction - 1e-9) + 1, len(cum)))

    @property
    def pcs_for_levels(self) -> dict[str, int]:
        """``{"0.7": k70, "0.8": k80, "0.9": k90}``."""
        return {str(q): self.pcs_for(q) for q in VARIANCE_LEVELS}

    def unit_axis(self, layer: int | None = None) -> torch.Tensor:
        a = self.axis[self.row(layer)].double()
        return a / a.norm()

    def project(self, vectors: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """PC coordinates of vectors ``[..., H]`` taken at the PCA layer -> ``[..., K]``.

        ``layer`` may be given for clarity; the PCA exists only at ``self.layer``.
        """
        if layer is not None and layer != self.layer:
            raise InputError(f"the persona space's PCA is at layer {self.layer}, not {layer}")
        return ((vectors.double() - self.mean.double()) @ self.components.double().T).float()

    def axis_projection(self, vectors: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Dot product of vectors ``[..., H]`` (taken at ``layer``, default the PCA layer)
        with the unit Assistant Axis at that layer -> ``[...]``."""
        return (vectors.double() @ self.unit_axis(layer)).float()

    @property
    def default_coords(self) -> torch.Tensor:
        """The default Assistant's PC coordinates ``[K]`` (PC1 > 0 by convention)."""
        return self.project(self.default[self.row()])

    def summary(self) -> dict:
        """Scalar facts for a metrics file."""
        ratio = self.explained_variance_ratio
        return {"n_roles": len(self.roles), "layer": self.layer, "n_components": int(ratio.numel()),
                "pc1_variance_ratio": float(ratio[0]),
                "pc2_variance_ratio": float(ratio[1]) if ratio.numel() > 1 else 0.0,
                **{f"pcs_for_{int(q * 100)}": self.pcs_for(q) for q in VARIANCE_LEVELS},
                "axis_pc1_cos": float(self.axis_pc1_cos[self.row()]),
                "axis_pc1_cos_min": float(self.axis_pc1_cos.min()),
                "axis_norm": float(self.axis[self.row()].norm()),
                "default_pc1": float(self.default_coords[0])}


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 1 else t


def assistant_axis(role_vectors: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """``mean(default) - mean(roles)`` per layer: ``[R, rows, H]``, ``[rows, H]`` -> ``[rows, H]``."""
    return default.double() - role_vectors.double().mean(0)


def pc1_per_layer(role_vectors: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """Unit PC1 of the centred role vectors at each layer ``[rows, H]`` (float64), signed so
    the default has a positive coordinate.

    Uses the ``R x R`` Gram matrix per layer, cheap when roles are far fewer than ``H``.
    """
    out = []
    for i in range(role_vectors.shape[1]):
        x = role_vectors[:, i].double()
        mu = x.mean(0)
        xc = x - mu
        _, vecs = torch.linalg.eigh(xc @ xc.T)
        pc1 = xc.T @ vecs[:, -1]
        pc1 = pc1 / pc1.norm()
        if (default[i].double() - mu) @ pc1 < 0:
            pc1 = -pc1
        out.append(pc1)
    return torch.stack(out)


def fit_persona_space(role_vectors: Mapping[str, torch.Tensor], default: torch.Tensor, layer: int,
                      layers: Sequence[int] | None = None) -> PersonaSpace:
    """Fit the persona space at ``layer`` and the Assistant Axis at every row.

    ``role_vectors`` maps role name to ``[rows, H]`` (``[num_layers + 1, H]`` when all
    layers were captured), ``default`` is ``[rows, H]``; ``layers`` gives the
    ``hidden_states`` index of each row (default ``0..rows-1``). Roles are sorted by name.
    """
    from sklearn.decomposition import PCA

    if len(role_vectors) < 2:
        raise InputError(f"a persona space needs at least 2 role vectors, got {len(role_vectors)}")
    roles = sorted(role_vectors)
    stacked = torch.stack([_as_rows(role_vectors[r]).float() for r in roles])  # [R, rows, H]
    default = _as_rows(default).float()
    if stacked.shape[1:] != default.shape:
        raise InputError(f"role vectors are {tuple(stacked.shape[1:])} but the default vector is "
                         f"{tuple(default.shape)}")
    layers = list(range(default.shape[0])) if layers is None else [int(x) for x in layers]
    if len(layers) != default.shape[0]:
        raise InputError(f"{len(layers)} layer indices for {default.shape[0]} rows")
    if layer not in layers:
        raise InputError(f"layer {layer} is not among the captured layers {layers}")
    r = layers.index(layer)

    x = stacked[:, r].double().numpy()
    mean = x.mean(0)
    # MeanScaler then PCA, as assistant-axis' notebook; centred R roles span at most R-1 directions
    pca = PCA(n_components=min(len(roles) - 1, x.shape[1]), svd_solver="full").fit(x - mean)
    components = pca.components_.copy()
    if (default[r].double().numpy() - mean) @ components[0] < 0:
        components[0] = -components[0]
    loadings = (x - mean) @ components.T

    axis = assistant_axis(stacked, default)
    pc1 = pc1_per_layer(stacked, default)
    cos = (axis * pc1).sum(-1) / axis.norm(dim=-1).clamp_min(1e-30)
    return PersonaSpace(
        roles=roles, layer=layer, layers=layers, role_vectors=stacked[:, r].clone(),
        default=default.clone(), axis=axis.float(), mean=torch.from_numpy(mean).float(),
        components=torch.from_numpy(components).float(),
        explained_variance=torch.from_numpy(pca.explained_variance_.copy()).float(),
        explained_variance_ratio=torch.from_numpy(pca.explained_variance_ratio_.copy()).float(),
        loadings=torch.from_numpy(loadings).float(), axis_pc1_cos=cos.float())


# --- trajectories -------------------------------------------------------------

def checkpoint_coordinates(space: PersonaSpace, role_vectors: Mapping[str, torch.Tensor],
                           default: torch.Tensor, layers: Sequence[int] | None = None,
                           n_pcs: int = 3) -> dict:
    """Place one checkpoint's role vectors and default vector in a reference persona space.

    Vectors are ``[rows, H]`` over ``layers`` (default: the space's layers); only the row at
    the space's PCA layer is used. Returns PC coordinates (first ``n_pcs``) and unit-axis
    projections for each reference role present, the default and the role mean, plus
    cos(checkpoint axis, reference axis) at that layer.
    """
    layers = list(space.layers) if layers is None else [int(x) for x in layers]
    if space.layer not in layers:
        raise InputError(f"checkpoint vectors lack layer {space.layer} (have {layers})")
    r = layers.index(space.layer)
    k = min(n_pcs, space.components.shape[0])
    present = [name for name in space.roles if name in role_vectors]
    if not present:
        raise InputError("no role of the reference persona space is present at this checkpoint")

    def place(v: torch.Tensor) -> dict:  # v: [H] at the PCA layer
        return {"pcs": [float(c) for c in space.project(v)[:k]], "axis": float(space.axis_projection(v))}

    role_rows = torch.stack([_as_rows(role_vectors[n])[r].float() for n in present])  # [R', H]
    d = _as_rows(default)[r].float()
    own_axis = d.double() - role_rows.double().mean(0)
    default_place, mean_place = place(d), place(role_rows.mean(0))
    return {
        "roles": {n: place(role_rows[i]) for i, n in enumerate(present)},
        "default": default_place,
        "role_mean": mean_place,
        "axis_gap": default_place["axis"] - mean_place["axis"],
        "axis_cos_reference": float(own_axis @ space.unit_axis() / own_axis.norm().clamp_min(1e-30)),
        "missing_roles": [n for n in space.roles if n not in role_vectors],
        "layer": space.layer,
        "n_pcs": k,
    }


# --- files --------------------------------------------------------------------

_TENSORS = ("role_vectors", "default", "axis", "mean", "components", "explained_variance",
            "explained_variance_ratio", "loadings", "axis_pc1_cos")


def save_persona_space(path: str | Path, space: PersonaSpace, metadata: dict | None = None) -> None:
    """Write the space as one safetensors file (atomic); metadata values are stored as JSON."""
    from persona_ops.interp.vectors import save_vectors

    tensors = {name: getattr(space, name).float().contiguous() for name in _TENSORS}
    tensors["layers"] = torch.tensor(space.layers, dtype=torch.int64)
    meta = {**space.metadata, **(metadata or {})}
    meta.update({"format": _FORMAT, "roles": space.roles, "layer": space.layer,
                 "sign_convention": "PC1 sign: default Assistant coordinate > 0; "
                                    "axis = mean(default) - mean(roles), points toward the Assistant"})
    save_vectors(path, tensors, meta)


def load_persona_space(path: str | Path) -> PersonaSpace:
    """Read a file written by ``save_persona_space``; other metadata lands in ``.metadata``."""
    from persona_ops.interp.vectors import decode_metadata, load_vectors

    tensors, raw = load_vectors(path)
    if raw.get("format") != _FORMAT or any(n not in tensors for n in _TENSORS):
        raise InputError(f"{path}: not a persona-space file (expected format {_FORMAT})")
    meta = decode_metadata(raw)
    roles, layer = meta.pop("roles"), int(meta.pop("layer"))
    meta.pop("format")
    return PersonaSpace(roles=list(roles), layer=layer, layers=[int(x) for x in tensors["layers"]],
                        metadata=meta, **{n: tensors[n] for n in _TENSORS})
