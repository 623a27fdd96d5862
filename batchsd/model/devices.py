"""Device and dtype choice: `auto|cpu|cuda[:N]` and `auto|fp32|fp16|bf16`, checked with clear errors."""
from __future__ import annotations

import os

import torch

from batchsd.errors import InputError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is cuda:$LOCAL_RANK (or cuda:0) when CUDA is available, else cpu."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise InputError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA and fp32 on CPU (bf16 is faster on CPUs with AMX/avx512-bf16: ask for it)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: use auto, fp32, fp16 or bf16")
    if device.type == "cpu" and name == "fp16":
        raise InputError("fp16 on the CPU is slow and poorly supported: use --dtype bf16 or fp32 on the CPU")
    return DTYPES[name]
