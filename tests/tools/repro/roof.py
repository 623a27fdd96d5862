"""torch.mm 4096x4096 fp32 vs bf16 rate on this machine (best of 3), for comparing with docs/performance.md."""
import sys, time, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import cpu_kind
print(cpu_kind(), "loadavg", open("/proc/loadavg").read().split()[:3])
for dt in (torch.float32, torch.bfloat16):
    a = torch.randn(4096, 4096).to(dt); b = torch.randn(4096, 4096).to(dt)
    torch.mm(a, b); best = 1e9
    for _ in range(3):
        t = time.perf_counter(); torch.mm(a, b); best = min(best, time.perf_counter() - t)
    print(dt, f"{2 * 4096**3 / best / 1e12:.3f} TFLOP/s")
