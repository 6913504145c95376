"""Activation interventions on the residual stream: add, ablate (CAFT) and cap (Assistant Axis).

Layer convention: ``layer L`` edits ``hidden_states[L]``, i.e. the output of decoder block
``L-1`` (persona_vectors' numbering, where ``vec[L]`` was measured), so ``1 <= L <= num_layers``.
At ``L = num_layers`` the edit is on the last block's output, before the final norm.

Operations, with ``u = v / |v|`` and all projections computed in fp32:

- ``add``:    ``h + coef * v``                      (raw vector, no normalisation)
- ``ablate``: ``h - coef * <h, u> u``                (``coef = 1`` removes the component: CAFT)
- ``cap``:    ``h - u * max(<h, u> - tau, 0)``       (projection clamped to at most ``tau``;
  this is assistant-axis' ``_apply_cap``; the paper's floor form is ``cap`` with ``-v`` and ``-tau``)

``coef`` and ``tau`` are scalars or per-row tensors ``[n]`` (one value per prompt of a
generation call), so a whole coefficient sweep runs as one batch.

Positions (padding never counts):

- ``prompt``: the tokens of the rendered chat up to and including the generation prompt;
  with a KV cache that is the prefill only, so decode steps are never edited.
- ``response``: every position whose output predicts a response token - the last prompt
  token and every generated token fed back during decoding. This is persona_vectors'
  ``response`` behaviour (it edits ``t[:, -1]`` on every forward), so the first generated
  token is already steered. In a teacher-forced forward over prompt + answer it is the
  last prompt token and all answer tokens (see :func:`teacher_forced_masks`).
- ``all``: the union of both (each position edited once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from persona_ops.errors import InputError

Kind = Literal["add", "ablate", "cap"]
Positions = Literal["prompt", "response", "all"]
KINDS = ("add", "ablate", "cap")
POSITIONS = ("prompt", "response", "all")


@dataclass
class Intervention:
    """One edit of the residual stream at one layer (see the module docstring)."""

    kind: Kind
    layer: int
    vector: torch.Tensor
    coef: float | torch.Tensor = 1.0
    tau: float | torch.Tensor = 0.0
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"intervention kind: expected one of {KINDS}, got {self.kind!r}")
        if self.positions not in POSITIONS:
            raise InputError(f"intervention positions: expected one of {POSITIONS}, got {self.positions!r}")
        if self.vector.ndim != 1:
            raise InputError(f"intervention vector must be 1-D [hidden], got shape {tuple(self.vector.shape)}")
        if self.kind != "add" and float(self.vector.float().norm()) == 0.0:
            raise InputError(f"{self.kind}: the vector must be non-zero")


def add(h: torch.Tensor, v: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``coef * v`` as a delta; ``coef`` broadcasts against ``h[..., :1]``."""
    return coef * v


def ablate(h: torch.Tensor, u: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Delta removing ``coef`` times the component of ``h`` along the unit vector ``u``."""
    return -(coef * (h @ u)[..., None]) * u


def cap(h: torch.Tensor, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Delta clamping the projection ``<h, u>`` to at most ``tau``."""
    return -((h @ u)[..., None] - tau).clamp(min=0) * u


def _as_rows(value: float | torch.Tensor) -> torch.Tensor:
    return value.detach().float().reshape(-1) if torch.is_tensor(value) else torch.tensor([float(value)])


@dataclass
class _Prepared:
    """An intervention with its tensors on the model's device; per-row params selected per batch."""

    spec: Intervention
    vec: torch.Tensor  # fp32 [H]: v for add, u = v/|v| otherwise
    param_all: torch.Tensor  # fp32 [n] or [1]: coef (add, ablate) or tau (cap)
    param: torch.Tensor = field(init=False)  # fp32 [B, 1, 1] or [1, 1, 1] for the current batch

    def __post_init__(self) -> None:
        self.param = self.param_all[:1].reshape(1, 1, 1) if self.param_all.numel() == 1 else self.param_all

    def select(self, rows: torch.Tensor | None) -> None:
        if self.param_all.numel() == 1:
            self.param = self.param_all[:1].reshape(1, 1, 1)
            return
        if rows is None:
            raise InputError("per-row coefficients need Steerer.select_rows(indices) before a forward")
        self.param = self.param_all[rows].reshape(-1, 1, 1)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 delta for ``h`` (fp32)."""
        if self.spec.kind == "add":
            return add(h, self.vec, self.param)
        if self.spec.kind == "ablate":
            return ablate(h, self.vec, self.param)
        return cap(h, self.vec, self.param)


def teacher_forced_masks(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | Sequence[int]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt, response)`` bool masks ``[B, T]`` for a forward over prompt + answer.

    Works for left or right padding: the real tokens of each row are read off
    ``attention_mask`` and the first ``prompt_lengths[b]`` of them are the prompt.
    ``response`` = the last prompt token and every answer token (see the module docstring).
    """
    real = attention_mask.bool()
    plen = torch.as_tensor(prompt_lengths, device=real.device).reshape(-1, 1)
    rank = real.long().cumsum(1)  # 1-based index among the row's real tokens
    prompt = real & (rank <= plen)
    response = real & (rank >= plen)
    return prompt, response


class Steerer:
    """Applies interventions through forward hooks on the decoder blocks.

    Use as a context manager around forwards. Before each forward the caller says which
    positions are prompt/response (:meth:`set_positions` for a prefill or teacher-forced
    forward, :meth:`set_decode` for KV-cached decode steps) and, with per-row parameters,
    which rows the batch holds (:meth:`select_rows`).
    """

    def __init__(self, layers: torch.nn.ModuleList, interventions: Sequence[Intervention],
                 num_rows: int | None = None):
        self.layers = layers
        n_layers = len(layers)
        param = next(layers.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self._by_block: dict[int, list[_Prepared]] = {}
        for spec in interventions:
            if not 1 <= spec.layer <= n_layers:
                raise InputError(f"intervention layer {spec.layer}: expected 1..{n_layers} "
                                 "(hidden_states index; block layer-1 is edited)")
            vec = spec.vector.detach().to(self.device, torch.float32)
            if spec.kind != "add":
                vec = vec / vec.norm()
            p = _as_rows(spec.tau if spec.kind == "cap" else spec.coef).to(self.device)
            if p.numel() != 1 and num_rows is not None and p.numel() != num_rows:
                raise InputError(f"per-row {'tau' if spec.kind == 'cap' else 'coef'} has {p.numel()} "
                                 f"values for {num_rows} rows")
            self._by_block.setdefault(spec.layer - 1, []).append(_Prepared(spec, vec, p))
        self._handles: list = []
        self._prompt: torch.Tensor | None = None
        self._response: torch.Tensor | None = None
        self._decode = False

    # --- state set by the caller before a forward ---
    def select_rows(self, rows: torch.Tensor | Sequence[int] | None) -> None:
        """Choose the per-row parameters for the rows of the next batch (indices into ``[n]``)."""
        idx = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        for preps in self._by_block.values():
            for p in preps:
                p.select(idx)

    def set_positions(self, prompt: torch.Tensor | None, response: torch.Tensor | None) -> None:
        """Masks ``[B, T]`` (bool) of the prompt and response positions of the next forward."""
        self._decode = False
        self._prompt = None if prompt is None else prompt.to(self.device, torch.bool)
        self._response = None if response is None else response.to(self.device, torch.bool)

    def set_decode(self) -> None:
        """Next forwards are cached decode steps: each row's new token is a response position."""
        self._decode = True
        self._prompt = self._response = None

    def layout(self) -> tuple:
        """What the hooks do, per edit in order: (block, kind, positions)."""
        return tuple((b, p.spec.kind, p.spec.positions) for b, p in self._prepared())

    def pin(self, slots: list[tuple[torch.Tensor, torch.Tensor]] | None, rows: int
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copy each edit's vector and current parameters (expanded to ``rows``) into fixed tensors
        and read them from there (the parameters until the next :meth:`select_rows`): a captured
        CUDA graph reads fixed addresses. ``slots`` are those of an earlier pin of the same :meth:`layout` (a
        graph captured then replays with these values), or None for new ones."""
        preps = [p for _, p in self._prepared()]
        if slots is None:
            slots = [(torch.empty_like(p.vec), torch.empty(rows, 1, 1, device=self.device)) for p in preps]
        for p, (vec, param) in zip(preps, slots):
            vec.copy_(p.vec)
            param.copy_(p.param.expand(rows, 1, 1))
            p.vec, p.param = vec, param
        return slots

    def _prepared(self) -> list[tuple[int, _Prepared]]:
        return [(b, p) for b in sorted(self._by_block) for p in self._by_block[b]]

    # --- hooks ---
    def _mask(self, positions: str) -> torch.Tensor | None | bool:
        """True = every position, False = none, else a [B, T] bool mask."""
        if self._decode:
            return positions != "prompt"
        if self._prompt is None or self._response is None:
            raise InputError("Steerer: call set_positions(...) or set_decode() before the forward")
        if positions == "prompt":
            return self._prompt
        if positions == "response":
            return self._response
        return self._prompt | self._response

    def _hook(self, block: int):
        preps = self._by_block[block]

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            hf, changed = h.float(), False
            for p in preps:  # in the order given: each edit sees the previous ones
                mask = self._mask(p.spec.positions)
                if mask is False:
                    continue
                d = p.delta(hf)
                hf = hf + (d if mask is True else d * mask[..., None])
                changed = True
            if not changed:
                return output
            new = hf.to(h.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook

    def __enter__(self) -> "Steerer":
        for block in self._by_block:
            self._handles.append(self.layers[block].register_forward_hook(self._hook(block)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
