"""Device and dtype choice: `auto|cpu|cuda[:N]` and `auto|fp32|fp16|bf16`, checked with clear errors;
the CPU's kind (`cpu_kind`) and the speed choices keyed on it.

Every speed choice on the CPU is a function of what the CPU has (its ISA level and AMX tiles), never
of timings taken at start-up, so that one machine makes the same choices, and so the same bits,
on every run (docs/performance.md has the measurements behind each rule):

    choice              no AMX                                 AMX
    --dtype auto        fp32                                   fp32 (bf16 is several times faster
                                                               there but its images differ from
                                                               fp32's: ask for it)
    --winograd auto     on for bf16/fp16, off for fp32         off (oneDNN's AMX convolutions beat it)
    --attention auto    fused (fast/fused_attention.py) for    fused, the tile kernel, for bf16
                        bf16 on CPUs with avx512-bf16, else
                        torch's scaled_dot_product_attention
    --epilogues auto    torch's ops (a tie there)              fused (fast/fused_epilogues.py) for bf16

Not a speed choice, keyed on the device alone (`default_low_memory`): `batchsd run`'s --low-memory
is on for the CPU (the text encoders and the UNet held in turn, model/residency.py: the same bits,
less peak memory; figures in docs/performance.md) and off on CUDA (there it moves idle parts to CPU
memory, which costs speed).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CpuKind:
    capability: str   # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    amx: bool         # AMX tiles usable (torch.cpu._is_amx_tile_supported())
    # the processor, "<vendor> family <f> model <m> (<model name>)" (cpu_model): CPUs with the same ISA
    # flags differ in speed (docs/performance.md, "Speed choices per CPU kind"); recorded, so that
    # figures and choices can be told apart by machine
    model: str = ""
    avx512_bf16: bool = False   # VDPBF16PS, bf16 pair dot products (the fused attention kernel's)

    def __str__(self) -> str:
        return (f"{self.capability}, AMX {'yes' if self.amx else 'no'}, "
                f"avx512-bf16 {'yes' if self.avx512_bf16 else 'no'}") + (f", {self.model}" if self.model else "")


def _cpuinfo(cpuinfo: str) -> dict[str, str] | None:
    """The first processor's block of /proc/cpuinfo (None where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break                                  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return fields


def has_avx512_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU flags list avx512_bf16 (Linux; False elsewhere)."""
    fields = _cpuinfo(cpuinfo)
    return fields is not None and "avx512_bf16" in fields.get("flags", "").split()


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor as /proc/cpuinfo names it (Linux; elsewhere platform.processor())."""
    fields = _cpuinfo(cpuinfo)
    if fields is None:
        import platform

        return platform.processor()
    name = fields.get("model name", "")
    if "vendor_id" not in fields:
        return name
    return f"{fields['vendor_id']} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}" + \
        (f" ({name})" if name else "")


def cpu_kind() -> CpuKind:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return CpuKind(torch.backends.cpu.get_cpu_capability(), bool(amx), cpu_model(), has_avx512_bf16())


def default_winograd(device: torch.device, dtype: torch.dtype, kind: CpuKind | None = None) -> bool:
    """`--winograd auto`: on the CPU for bf16/fp16 without AMX; off with AMX and for fp32 (the table
    above)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    return not (kind or cpu_kind()).amx


def default_attention(device: torch.device, dtype: torch.dtype, kind: CpuKind | None = None) -> bool:
    """`--attention auto`: the fused kernel on the CPU for bf16 where the CPU has avx512-bf16 (every
    CPU with AMX has it; fused_attention.kernel_source picks the tile kernel there); torch's
    everywhere else (the table above)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    return (kind or cpu_kind()).avx512_bf16


def default_fused_epilogues(device: torch.device, dtype: torch.dtype, kind: CpuKind | None = None) -> bool:
    """The transformers' GEGLU and residual adds in oneDNN linears' epilogues (fast/fused_epilogues.py):
    on the CPU for bf16 with AMX, where they are faster; torch's ops elsewhere (without AMX they measured
    a tie: docs/performance.md, the choices table)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    return (kind or cpu_kind()).amx


def default_low_memory(device: torch.device) -> bool:
    """`batchsd run`'s --low-memory when not given: on for the CPU, off on CUDA (the docstring above).
    Pipeline.load's own default stays off: without a job's look-ahead (Pipeline.encode_ahead) each
    generate call with new prompts would read the UNet again."""
    return device.type == "cpu"


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
