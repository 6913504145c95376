"""Fused input projections: q/k/v as one GEMM, gate/up as one, for inference on the GPU.

At a decode step's few rows a GEMM is bound by reading its weight, and cuBLAS reads a thin
weight slower than a wide one: on an H200 at 40 rows, OLMo-2-7B's q, k and v (4096 x 4096 each)
at ~2.4 TB/s, the three stacked at ~3.4 TB/s (``python -m bench.decode_gemm``; bench/RESULTS.md).
While :func:`fused_projections` is active, the projections of one block that read the same input
(``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``), when they are plain ``nn.Linear``
layers of one dtype on one CUDA device, run as one GEMM over their stacked weights: the first
call computes every output, the others return their slices of it. The stacking costs no memory:
the first time, the layers' weights (and biases) become views into one stacked tensor, and stay
so (ordinary parameters, written in place as before). Autograd takes the usual path. The engine
and the server's batcher decode with it; capture does not (at its thousands of rows the GEMMs are
compute-bound, and fused it measured slower). ``PERSONA_OPS_FUSED_PROJECTIONS=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from persona_ops.kernels.forwards import replaced_forwards

ENABLED = os.environ.get("PERSONA_OPS_FUSED_PROJECTIONS", "1") != "0"
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
DEVICE_TYPES = ("cuda",)  # where fusing pays (on the CPU, cpu_linear's packed weights do instead)


def _stack_into_views(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One tensor holding ``tensors`` stacked along dim 0; each becomes a view of its rows
    (ordinary tensors, also when called under inference mode)."""
    with torch.inference_mode(False), torch.no_grad():
        stacked = torch.cat([t.detach() for t in tensors])
        start = 0
        for t in tensors:
            t.data = stacked[start:start + t.shape[0]]
            start += t.shape[0]
    return stacked


class _Group:
    """Linear layers reading one input, computed by one GEMM."""

    def __init__(self, members: Sequence[torch.nn.Linear]):
        self.members = list(members)
        self.weight = _stack_into_views([m.weight for m in members])
        self.bias = _stack_into_views([m.bias for m in members]) if members[0].bias is not None else None
        self.splits = [m.out_features for m in members]
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._pending: set[int] = set()

    def intact(self) -> bool:
        """The members' weights are still the views (not replaced by other tensors)."""
        start = 0
        for m in self.members:
            w = m.weight
            if w.untyped_storage().data_ptr() != self.weight.untyped_storage().data_ptr() or \
                    w.storage_offset() != start * w.shape[1]:
                return False
            start += w.shape[0]
        return True

    def forward_of(self, i: int):
        member = self.members[i]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and (x.requires_grad or member.weight.requires_grad):
                return F.linear(x, member.weight, member.bias)
            if x is not self._input or i not in self._pending:
                self._outputs = F.linear(x, self.weight, self.bias).split(self.splits, dim=-1)
                self._input, self._pending = x, set(range(len(self.members)))
            self._pending.discard(i)
            out = self._outputs[i]
            if not self._pending:  # every member had its slice: hold no tensors
                self._input, self._outputs = None, ()
            return out

        return forward


def _fusable(layers: Sequence[torch.nn.Module]) -> bool:
    first = layers[0]
    return (all(type(m) is torch.nn.Linear and "forward" not in m.__dict__ for m in layers)
            and first.weight.device.type in DEVICE_TYPES
            and all(m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device
                    and m.in_features == first.in_features and (m.bias is None) == (first.bias is None)
                    for m in layers))


@contextlib.contextmanager
def fused_projections(model: torch.nn.Module) -> Iterator[None]:
    """Run the projections of ``model`` that share an input as one GEMM each, for the duration.

    A no-op for models on other devices; nested use keeps the outer fusion."""
    replacements = []
    for module in model.modules() if ENABLED else ():
        for names in GROUPS:
            layers = [getattr(module, n, None) for n in names]
            if any(m is None for m in layers) or not _fusable(layers):
                continue
            group = getattr(layers[0], "_fused_group", None)  # kept on the layer: freed with the model
            if group is None or not group.intact():
                group = layers[0]._fused_group = _Group(layers)
            replacements += [(m, group.forward_of(i)) for i, m in enumerate(layers)]
    with replaced_forwards(replacements):
        yield
