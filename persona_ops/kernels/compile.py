"""``torch.compile`` of decoder blocks for the duration of a call (capture; generation's prefill and decode)."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)
_FAILED: set[type] = set()  # block classes whose compile failed: they run eagerly from then on


def _compiled_or_eager(blk: torch.nn.Module) -> Callable:
    """``blk.forward`` through ``torch.compile``; if compiling fails, the eager forward (for every
    block of that class, from then on, with one warning)."""
    import torch._dynamo

    eager = blk.forward
    compiled = torch.compile(eager, dynamic=True)

    def forward(*args, **kwargs):
        if type(blk) not in _FAILED:
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:  # an optimisation: fall back
                _FAILED.add(type(blk))
                log.warning("compiling %s failed (%s: %s); its blocks run eagerly", type(blk).__name__,
                            type(e).__name__, e)
        return eager(*args, **kwargs)

    return forward


@contextlib.contextmanager
def compiled_blocks(blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run the blocks' ``forward`` through ``torch.compile`` (dynamic shapes) for the duration.

    Only ``forward`` is compiled, so the capture hooks (and the early stop) stay eager. The
    compiled code is shared by all blocks of one class (dynamo caches per code object); each
    block keeps its compiled wrapper (making one costs ~5 ms, which adds up per CUDA-graph capture).
    A compile that fails falls back to the eager blocks.
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(blocks))
    patched = []
    for blk in blocks:
        if "forward" not in blk.__dict__:
            if "_compiled_forward" not in blk.__dict__:
                blk._compiled_forward = _compiled_or_eager(blk)
            blk.forward = blk._compiled_forward
            patched.append(blk)
    try:
        yield
    finally:
        for blk in patched:
            del blk.forward
