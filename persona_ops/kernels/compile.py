"""``torch.compile`` of decoder blocks for the duration of a call (capture; generation's prefill and decode)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


@contextlib.contextmanager
def compiled_blocks(blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run the blocks' ``forward`` through ``torch.compile`` (dynamic shapes) for the duration.

    Only ``forward`` is compiled, so the capture hooks (and the early stop) stay eager. The
    compiled code is shared by all blocks of one class (dynamo caches per code object); each
    block keeps its compiled wrapper (making one costs ~5 ms, which adds up per CUDA-graph capture).
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(blocks))
    patched = []
    for blk in blocks:
        if "forward" not in blk.__dict__:
            if "_compiled_forward" not in blk.__dict__:
                blk._compiled_forward = torch.compile(blk.forward, dynamic=True)
            blk.forward = blk._compiled_forward
            patched.append(blk)
    try:
        yield
    finally:
        for blk in patched:
            del blk.forward
