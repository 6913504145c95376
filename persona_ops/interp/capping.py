"""Activation capping along the Assistant Axis (Lu et al. 2026): a capping spec and its interventions.

The paper keeps the residual stream from drifting away from the Assistant: at each capped
layer the projection on the unit Assistant Axis ``u`` is floored at ``floor``, the
``percentile``-th percentile of the default Assistant's projections (25 in the paper)::

    h <- h + u * max(floor - <h, u>, 0)

That is :func:`persona_ops.interp.interventions.cap` (a ceiling) on the opposite direction: a spec
stores ``vector = -u`` and ``tau = -floor``, so ``<h, vector> <= tau`` after the edit. The
default projections are those of the per-sample mean response activations of the default
role (the pipeline's ``activations/default_activations.safetensors``).

Layers follow ``hidden_states`` indexing (``persona_ops.interp.vectors.LAYER_CONVENTION``); capping
layer ``L`` edits the output of decoder block ``L-1``, so ``1 <= L <= num_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from persona_ops.errors import InputError

_FORMAT = "capping-spec/1"
CONVENTION = ("vector = -unit Assistant Axis, tau = -floor: cap <h, vector> <= tau keeps the "
              "Assistant-Axis projection >= floor (the percentile of the default projections)")


@dataclass
class CappingSpec:
    """Per capped layer: the unit vector to cap along (away from the Assistant) and its tau."""

    layers: list[int]
    vectors: torch.Tensor  # [k, H] float32 unit rows, -axis direction
    tau: torch.Tensor  # [k] float32: ceiling of <h, vectors[i]> = -floor
    percentile: float
    metadata: dict = field(default_factory=dict)

    @property
    def floors(self) -> torch.Tensor:
        """The floor on the Assistant-Axis projection at each layer ``[k]``."""
        return -self.tau

    def check_fits(self, num_layers: int, hidden_size: int, source: str = "capping spec") -> None:
        """InputError unless the spec's layers and vector width fit a model of this shape."""
        if max(self.layers) > num_layers or self.vectors.shape[-1] != hidden_size:
            raise InputError(f"{source}: layers {self.layers} and hidden size {self.vectors.shape[-1]} do not fit "
                             f"the model ({num_layers} layers, hidden size {hidden_size}); was it made for another model?")

    def interventions(self, positions: str = "all") -> list:
        """``cap`` interventions for :func:`persona_ops.inference.engine.generate_text`, ``sample_chat``
        or a :class:`persona_ops.interp.interventions.Steerer`."""
        from persona_ops.interp.interventions import Intervention

        return [Intervention("cap", layer, self.vectors[i], tau=float(self.tau[i]), positions=positions)
                for i, layer in enumerate(self.layers)]


def layer_range(first_last: Sequence[int] | None, default_layer: int) -> list[int]:
    """``[first, last]`` (inclusive) as a list; ``None`` = ``[default_layer]``."""
    if first_last is None:
        return [default_layer]
    first, last = first_last
    return list(range(first, last + 1))


def compute_capping(axis: torch.Tensor, axis_layers: Sequence[int], default_acts: torch.Tensor,
                    acts_layers: Sequence[int], layers: Sequence[int], percentile: float,
                    num_layers: int) -> CappingSpec:
    """The capping spec at ``layers`` from a persona space's axis and the default activations.

    ``axis`` is ``[rows, H]`` over ``axis_layers``; ``default_acts`` is ``[n, rows', H]`` over
    ``acts_layers`` (one mean response activation per default-Assistant sample). The floor at
    each layer is ``numpy.percentile(default_acts @ unit_axis, percentile)`` (linear interpolation).
    """
    axis_layers, acts_layers = [int(x) for x in axis_layers], [int(x) for x in acts_layers]
    bad = [L for L in layers if not 1 <= L <= num_layers]
    if bad:
        raise InputError(f"capping.layers: {bad} outside 1..{num_layers} (hidden_states indices; "
                         "capping L edits the output of block L-1)")
    missing = [L for L in layers if L not in axis_layers or L not in acts_layers]
    if missing:
        raise InputError(f"capping.layers: {missing} were not captured (the persona space has layers "
                         f"{axis_layers}); set activations.all_layers or activations.layers")
    if default_acts.shape[0] == 0:
        raise InputError("capping: no default-Assistant activations")
    vectors, floors = [], []
    for L in layers:
        a = axis[axis_layers.index(L)].double()
        if float(a.norm()) == 0.0:
            raise InputError(f"capping: the Assistant Axis is zero at layer {L}")
        u = a / a.norm()
        proj = (default_acts[:, acts_layers.index(L)].double() @ u).numpy()
        floors.append(float(np.percentile(proj, percentile)))
        vectors.append(-u)
    return CappingSpec(layers=list(layers), vectors=torch.stack(vectors).float(),
                       tau=-torch.tensor(floors, dtype=torch.float64).float(), percentile=float(percentile),
                       metadata={"n_default_samples": int(default_acts.shape[0])})


def save_capping(path: str | Path, spec: CappingSpec, metadata: dict | None = None) -> None:
    """One safetensors file (atomic): ``vectors``, ``tau``, ``layers``; metadata as JSON strings."""
    from persona_ops.interp.vectors import save_vectors

    meta = {**spec.metadata, **(metadata or {}), "format": _FORMAT, "percentile": spec.percentile,
            "convention": CONVENTION}
    save_vectors(path, {"vectors": spec.vectors.float().contiguous(), "tau": spec.tau.float().contiguous(),
                        "layers": torch.tensor(spec.layers, dtype=torch.int64)}, meta)


def load_capping(path: str | Path) -> CappingSpec:
    """Read a file written by :func:`save_capping` (e.g. ``outputs/persona_space/capping.safetensors``)."""
    from persona_ops.interp.vectors import NotSafetensorsError, decode_metadata, load_vectors

    try:
        tensors, raw = load_vectors(path)
    except NotSafetensorsError as e:  # e.g. the capping.json summary
        raise InputError(f"{path}: not a capping spec ({e.reason})") from None
    if raw.get("format") != _FORMAT or any(k not in tensors for k in ("vectors", "tau", "layers")):
        raise InputError(f"{path}: not a capping spec (expected format {_FORMAT} with vectors, tau, layers; "
                         "the persona-space pipeline's capping stage writes one)")
    meta = decode_metadata(raw)
    percentile = float(meta.pop("percentile"))
    return CappingSpec(layers=[int(x) for x in tensors["layers"]], vectors=tensors["vectors"].float(),
                       tau=tensors["tau"].float(), percentile=percentile, metadata=meta)
