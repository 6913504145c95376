"""Per-row LoRA: one forward in which every row computes with its own adapter (or none).

The model's PEFT LoRA layers stay switched off (the base weights alone) while a forward hook on
each adds ``B_a (A_a x) s_a`` of the row's adapter ``a``: the adapters' ``A`` stacked into one
``[R, in]`` matrix, their ``B`` (scaling folded in) into ``[out, R]``, and a per-row mask keeping
the ``R`` columns of the row's adapter. Two thin GEMMs per layer serve every row, so rows of any
mix of adapters share one decode batch and one captured step; a row's adapter is a row of a
table, like its steering. Computed in the model's dtype (PEFT computes the delta in the adapter
weights' dtype, fp32 by default: equal within bf16 rounding on GPU, to fp32 rounding on CPU).
Plain LoRA on linear layers only (no DoRA, no LoRA bias, no embedding or convolution layers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from persona_ops.errors import InputError


class RowLora:
    """The stacked LoRA weights of ``adapters`` (served name -> PEFT adapter name) in ``model``,
    and a mask table of ``rows`` rows (a row without an adapter computes the base model)."""

    def __init__(self, model: torch.nn.Module, adapters: Mapping[str, str], rows: int):
        self.index = {name: i for i, name in enumerate(adapters)}
        peft_names = list(adapters.values())
        self.layers: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.masks: dict[tuple[int, ...], torch.Tensor] = {}  # column owners -> [rows, R] mask
        self._owners: dict[tuple[int, ...], torch.Tensor] = {}
        for path, module in model.named_modules():
            if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
                continue
            present = [(i, n) for i, n in enumerate(peft_names) if n in module.lora_A]
            if not present:
                continue
            base = module.base_layer
            for i, n in present:
                a, b = module.lora_A[n], module.lora_B[n]
                if (not isinstance(base, torch.nn.Linear) or not isinstance(a, torch.nn.Linear)
                        or getattr(module, "use_dora", {}).get(n) or b.bias is not None):
                    raise InputError(f"adapter {list(adapters)[i]!r}: {path}: only plain LoRA on linear "
                                     "layers can be served (no DoRA, LoRA bias, embedding or convolution layers)")
            dtype, dev = base.weight.dtype, base.weight.device
            stacked_a = torch.cat([module.lora_A[n].weight for _, n in present]).to(dev, dtype)
            stacked_b = torch.cat([module.lora_B[n].weight * module.scaling[n] for _, n in present], 1).to(dev, dtype)
            owners = tuple(i for i, n in present for _ in range(module.lora_A[n].weight.shape[0]))
            if owners not in self.masks:
                self.masks[owners] = torch.zeros(rows, len(owners), dtype=dtype, device=dev)
                self._owners[owners] = torch.tensor(owners, device=dev)
            self.layers.append((module, stacked_a, stacked_b, self.masks[owners]))

    def assign(self, row: int, adapter: str | None) -> None:
        """Row ``row`` computes with ``adapter`` (a served name; None: the base model)."""
        if adapter is not None and adapter not in self.index:
            raise KeyError(f"adapter {adapter!r} is not served per row")
        a = -1 if adapter is None else self.index[adapter]
        for owners, mask in self.masks.items():
            mask[row] = (self._owners[owners] == a).to(mask.dtype)

    def move(self, src: int, dst: int) -> None:
        for mask in self.masks.values():
            mask[dst] = mask[src]

    def clear(self, row: int) -> None:
        for mask in self.masks.values():
            mask[row] = 0

    @contextlib.contextmanager
    def applied(self, select: slice | torch.Tensor) -> Iterator[None]:
        """Hooks adding each selected row's LoRA delta for the forwards inside (the batch's rows
        ``select``, in order)."""

        def hook_for(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor):
            m = mask[select]

            def hook(module, args, output):
                x = args[0]
                xa = (x @ a.T) * (m[:, None] if x.dim() == 3 else m)
                return output + xa @ b.T

            return hook

        handles = [module.register_forward_hook(hook_for(a, b, mask)) for module, a, b, mask in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
