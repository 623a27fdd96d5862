"""oneDNN convolutions (PackedConv2d, fp32/bf16) at small spatial sizes: bits at 1..16 threads, and the
implementation oneDNN picks (ONEDNN_VERBOSE)."""
import os, sys, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import cpu_kind
from batchsd.model.fast.packed_conv import PackedConv2d
print(cpu_kind())
CL = torch.channels_last
cases = [(1280, 1280, 2, 1), (1280, 1280, 2, 2), (1280, 1280, 4, 2), (960, 640, 8, 1), (960, 640, 8, 2), (640, 640, 8, 1),
         (1280, 1280, 1, 2), (2560, 1280, 4, 2), (320, 320, 32, 2), (1280, 1280, 8, 2), (640, 640, 16, 2), (1920, 1280, 8, 2), (512, 512, 8, 1)]
dts = [torch.float32, torch.bfloat16] if len(sys.argv) < 2 else [getattr(torch, sys.argv[1])]
for dt in dts:
    for ci, co, hw, b in cases:
        conv = torch.nn.Conv2d(ci, co, 3, padding=1).to(dt).to(memory_format=CL).eval().requires_grad_(False)
        conv.__class__ = PackedConv2d
        x = torch.randn(b, ci, hw, hw, generator=torch.Generator().manual_seed(0)).to(dt).contiguous(memory_format=CL)
        outs = {}
        with torch.inference_mode():
            for t in (1, 2, 3, 4, 5, 6, 8, 12, 16):
                torch.set_num_threads(t)
                outs[t] = conv(x)
        torch.set_num_threads(2)
        diff = [t for t in outs if not torch.equal(outs[t], outs[1])]
        print(f"{str(dt)[6:]:8s} Ci={ci} Co={co} {hw}x{hw} B={b}: threads differing from T=1: {diff or 'none'}", flush=True)
