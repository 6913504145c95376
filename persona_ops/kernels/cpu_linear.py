"""CPU linear layers through oneDNN on prepacked weights, for inference.

On CPU, ``F.linear`` runs MKL's GEMM. At the row counts of decoding and capture (20-500 rows,
576-4096 features) oneDNN's JIT kernels on a weight reordered once into their blocked layout
are 1.3-2x faster on AVX-512 hosts (``python -m bench.cpu_linear``; bench/RESULTS.md). While
:func:`packed_linears` is active, every plain ``nn.Linear`` of a CPU model in fp32 (and bf16 where
the CPU has oneDNN's bf16 kernels) runs ``torch.ops.mkldnn._linear_pointwise`` on its packed weight.
Layers that need autograd, and inputs of another dtype, take the usual path; a weight changed in
place is packed again.

The packed copies cost as much memory as the linear weights while the context is open.
``PERSONA_OPS_PACKED_LINEARS=0`` turns the path off.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F

from persona_ops.kernels.forwards import replaced_forwards

ENABLED = os.environ.get("PERSONA_OPS_PACKED_LINEARS", "1") != "0"


def packed_dtypes() -> tuple[torch.dtype, ...]:
    """fp32, and bf16 where the CPU has oneDNN's bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def available() -> bool:
    return ENABLED and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _PackedForward:
    """``forward`` of one ``nn.Linear`` on its packed weight (repacked when the weight changes)."""

    def __init__(self, module: torch.nn.Linear):
        self.module = module
        self._pack()

    def _pack(self) -> None:
        w = self.module.weight
        self.key = (w.data_ptr(), w._version)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        w = m.weight
        if x.dtype != w.dtype or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return F.linear(x, w, m.bias)
        if (w.data_ptr(), w._version) != self.key:
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, m.bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module) -> Iterator[None]:
    """Run the CPU ``nn.Linear`` layers of ``model`` on packed weights for the duration.

    A no-op for models on other devices; nested use keeps the outer packing.
    """
    dtypes = packed_dtypes() if available() else ()
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__
              and m.weight.device.type == "cpu" and m.weight.dtype in dtypes]
    with replaced_forwards((m, _PackedForward(m)) for m in layers):
        yield
