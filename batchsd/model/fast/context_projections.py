"""The cross-attentions' K and V projections of the text context, computed once per sampling loop.

A sampler calls the UNet once per step with the same text context (the same tensor objects: Pipeline
builds them before the loop, one per forward shape). Each cross-attention projects that context to
its keys and values, `to_k(context)` and `to_v(context)`: the same products at every step. Inside
`reuse_context_projections(unet)` each cross-attention keeps them from its first call on a context
and reuses them while the context is that same tensor object: the same kernels on the same inputs,
so the same bits as computing them again (tests/model/test_unet.py). Outside it (and under
torch.compile, whose graphs would have to guard on it) nothing is kept.

What it costs: the kept keys and values, per context, 2 x tokens x channels for every cross-attention.
What it saves: those projections at every step after the first (figures for both:
docs/performance.md, bench_context_projections.py).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


@contextlib.contextmanager
def reuse_context_projections(unet: nn.Module) -> Iterator[int]:
    """Keep each cross-attention's K/V projections of a context for the body's duration (modules with a
    `context_cache` attribute: unet.CrossAttention); yields how many modules keep them."""
    modules = [m for m in unet.modules() if hasattr(m, "context_cache")]
    for m in modules:
        m.context_cache = {}
    try:
        yield len(modules)
    finally:
        for m in modules:
            m.context_cache = None
