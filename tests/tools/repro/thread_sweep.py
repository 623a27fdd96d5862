"""Thread-count dependence at fixed shapes: each op at torch.set_num_threads(1, 2, 3, 4) on the same
inputs (3 and 4 oversubscribe this 2-core VM: correctness only). Prints which thread counts give bits
different from 1 thread (max abs diff)."""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import cpu_kind
from batchsd.model.fast.packed_conv import PackedConv2d
from batchsd.model.fast.winograd import WinogradConv2d
CL = torch.channels_last
print(cpu_kind())
THREADS = (1, 2, 3, 4, 5, 8)


def sweep(name, fn, *inp):
    outs = {}
    for t in THREADS:
        torch.set_num_threads(t)
        with torch.inference_mode():
            outs[t] = fn(*[x.clone(memory_format=torch.preserve_format) if isinstance(x, torch.Tensor) else x for x in inp])
    torch.set_num_threads(2)
    cells = []
    for t in THREADS[1:]:
        a, b = outs[t], outs[1]
        cells.append(f"T{t}:" + ("=" if torch.equal(a, b) else f"{(a.float() - b.float()).abs().max().item():.1e}"))
    print(f"  {name:55s} " + " ".join(cells), flush=True)


for dt in (torch.float32, torch.bfloat16):
    print("dtype", dt)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dt)
    for shape in [(2, 320, 32, 32), (1, 320, 32, 32), (2, 640, 16, 16), (2, 1280, 8, 8), (1, 128, 256, 256), (2, 1024, 2560)]:
        x = r(*shape)
        if len(shape) == 4:
            x = x.contiguous(memory_format=CL)
        sweep(f"silu {shape}", F.silu, x)
        sweep(f"gelu {shape}", F.gelu, x)
    x = r(2, 1024, 2560)
    sweep("gelu(GEGLU gate view) [2,1024,1280 of 2560]", lambda x: F.gelu(x.chunk(2, -1)[1]), x)
    for (m, k, n) in [(1, 1280, 1280), (2, 320, 1280), (2, 1280, 1280), (4, 1280, 1280), (2048, 320, 320), (2048, 320, 2560),
                      (2048, 1280, 320), (154, 768, 320), (8192, 320, 320)]:
        w = r(n, k) / k ** 0.5
        sweep(f"linear M={m} K={k} N={n}", lambda x, w=w: F.linear(x, w), r(m, k))
    for (ci, co, hw, b) in [(320, 320, 32, 2), (320, 320, 32, 1), (1280, 1280, 8, 2), (640, 640, 16, 2), (128, 128, 256, 1),
                            (512, 512, 64, 1), (2560, 1280, 8, 2), (4, 320, 32, 2)]:
        conv = torch.nn.Conv2d(ci, co, 3, padding=1).to(dt).to(memory_format=CL).eval().requires_grad_(False)
        x = r(b, ci, hw, hw).contiguous(memory_format=CL)
        sweep(f"conv plain Ci={ci} Co={co} {hw}x{hw} B={b}", conv, x)
        conv.__class__ = PackedConv2d
        sweep(f"conv packed Ci={ci} Co={co} {hw}x{hw} B={b}", conv, x)
        if ci >= 320:
            c2 = torch.nn.Conv2d(ci, co, 3, padding=1).to(dt).to(memory_format=CL).eval().requires_grad_(False)
            c2.__class__ = WinogradConv2d
            c2.winograd = True
            sweep(f"conv winograd Ci={ci} Co={co} {hw}x{hw} B={b}", c2, x)
    for (c, hw, b) in [(320, 32, 2), (320, 32, 1), (320, 16, 2), (128, 256, 1), (512, 64, 1)]:
        gn = torch.nn.GroupNorm(32, c).to(dt)
        x = r(b, c, hw, hw)
        sweep(f"group_norm cl C={c} {hw}x{hw} B={b}", gn, x.contiguous(memory_format=CL))
        sweep(f"group_norm nchw C={c} {hw}x{hw} B={b}", gn, x.contiguous())
    for (b, t, c) in [(2, 1024, 320), (2, 64, 1280), (1, 77, 768)]:
        ln = torch.nn.LayerNorm(c).to(dt)
        sweep(f"layer_norm B={b} T={t} C={c}", ln, r(b, t, c))
    for (b, h, n, m, d) in [(2, 8, 1024, 1024, 40), (2, 8, 1024, 77, 40), (2, 8, 64, 64, 160), (2, 8, 1, 77, 160),
                            (2, 8, 1, 1, 160), (1, 1, 1024, 1024, 512), (1, 1, 4096, 4096, 512), (1, 12, 77, 77, 64)]:
        sweep(f"sdpa B={b} h={h} N={n} M={m} d={d}", lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
              r(b, h, n, d), r(b, h, m, d), r(b, h, m, d))
    sweep("sdpa causal B=1 h=12 N=77 d=64 (CLIP)", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
          r(1, 12, 77, 64), r(1, 12, 77, 64), r(1, 12, 77, 64))
    sweep("bmm [16,512,640]x[16,640,640] (Winograd)", torch.bmm, r(16, 512, 640), r(16, 640, 640))
