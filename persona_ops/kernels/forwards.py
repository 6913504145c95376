"""Layers' ``forward`` replaced for the duration of a context (instance attributes, removed after)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch


@contextlib.contextmanager
def replaced_forwards(replacements: Iterable[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Give each module its function as ``forward`` until the context ends."""
    patched: list[torch.nn.Module] = []
    try:
        for module, forward in replacements:
            module.forward = forward
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward
