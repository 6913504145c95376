"""Vector geometry and layer-numbering converters.

Our layer ``L`` is ``hidden_states[L]`` (row 0 = embeddings). Other tools number layers by
decoder module: assistant-axis' ``model.layers[i]`` output, repeng's layer ``i`` and
EasySteer's layer id ``i`` are our ``i + 1`` - except the last block: our last row,
``L = num_layers``, is HF's ``hidden_states[-1]``, taken *after* the final norm (as
persona_vectors), while their last layer is the block's raw output. The converters below move
rows, they cannot undo a norm: a vector's last row converted either way is not the other
tool's last-layer vector (steering at our last row edits the pre-norm stream).
"""

from __future__ import annotations

from typing import Mapping

import torch

# Tools whose layer i is the output of decoder block i (= our row i + 1).
BLOCK_INDEXED = ("assistant-axis", "repeng", "easysteer")


def to_block_indexed(vec: torch.Tensor) -> torch.Tensor:
    """``[num_layers + 1, h]`` (ours) -> ``[num_layers, h]`` indexed by decoder block (row 0 dropped;
    the last row stays post-norm, see the module docstring)."""
    return vec[1:].clone()


def from_block_indexed(vec: torch.Tensor, embedding_row: torch.Tensor | None = None) -> torch.Tensor:
    """``[num_layers, h]`` indexed by decoder block -> ours, with a zero (or given) embedding row."""
    row0 = torch.zeros_like(vec[:1]) if embedding_row is None else embedding_row.reshape(1, -1)
    return torch.cat([row0, vec], dim=0)


def our_layer(tool: str, layer: int) -> int:
    """Translate another tool's layer number into ours (for a block-indexed tool's last layer the
    row number matches but our row is after the final norm)."""
    if tool == "persona_vectors":
        return layer
    if tool in BLOCK_INDEXED:
        return layer + 1
    raise ValueError(f"unknown tool {tool!r}; expected persona_vectors or one of {BLOCK_INDEXED}")


def norms(vec: torch.Tensor) -> torch.Tensor:
    """L2 norm of each layer's row: ``[rows, h] -> [rows]``."""
    return vec.float().norm(dim=-1)


def cosine_matrix(vectors: Mapping[str, torch.Tensor], layer: int | None = None) -> torch.Tensor:
    """Pairwise cosine similarity of named vectors, at one layer (``[n, n]``) or at every
    layer (``[rows, n, n]``) when ``layer`` is None."""
    stacked = torch.stack([v.float() for v in vectors.values()])  # [n, rows, h]
    if layer is not None:
        stacked = stacked[:, layer : layer + 1]
    unit = torch.nn.functional.normalize(stacked, dim=-1).transpose(0, 1)  # [rows, n, h]
    sims = unit @ unit.transpose(1, 2)
    return sims[0] if layer is not None else sims


def combine(terms: Mapping[str, float], vectors: Mapping[str, torch.Tensor], normalize: bool = False) -> torch.Tensor:
    """Vector arithmetic: ``sum(weight * vectors[name])``, each term optionally unit-normalised per layer."""
    out = None
    for name, weight in terms.items():
        v = vectors[name].float()
        if normalize:
            v = torch.nn.functional.normalize(v, dim=-1)
        out = weight * v if out is None else out + weight * v
    if out is None:
        raise ValueError("combine needs at least one term")
    return out


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D series (e.g. projection vs judged trait score)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return float((x @ y) / denom) if denom > 0 else float("nan")
