"""Shared helpers for the batch/thread invariance study (docs/reproducibility.md)."""
import os
import platform
import torch

def cpu_kind():
    try:
        model = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
        flags = [l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")][0]
    except Exception:
        model, flags = platform.processor(), []
    amx = any(f.startswith("amx") for f in flags)
    return (f"{model}, {os.cpu_count()} cpus, torch {torch.__version__}, capability "
            f"{torch.backends.cpu.get_cpu_capability()}, AMX {'yes' if amx else 'no'}, "
            f"avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, threads {torch.get_num_threads()}")

def diff(a, b):
    a, b = a.float(), b.float()
    return (a - b).abs().max().item()

def cmp(a, b):
    """'=' if bitwise equal else max abs diff."""
    if torch.equal(a, b):
        return "="
    return f"{diff(a, b):.2e}"

CKPT = os.environ.get("BATCHSD_REPRO_CKPT", "/tmp/golden/sd15.safetensors")   # a random full-width SD 1.5 file: tests/model/ref_checkpoint.random_sd15_checkpoint
