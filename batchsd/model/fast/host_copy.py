"""Device results back to the host: `to_host` starts a pinned, non-blocking copy from CUDA,
`host_array` waits for it, so the CPU turns one chunk into PNG-ready arrays while the GPU decodes
the next (Pipeline._decode). On the CPU both are pass-throughs.
"""
from __future__ import annotations

import numpy as np
import torch


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a tensor to CPU memory: pinned and non-blocking from CUDA (with the event that
    says it is done), the tensor itself when it is already on the CPU."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return host, done


def host_array(copy: tuple[torch.Tensor, torch.cuda.Event | None]) -> np.ndarray:
    """The numpy array of a `to_host` copy, once the copy has finished."""
    host, done = copy
    if done is not None:
        done.synchronize()
    return host.numpy()
