"""Single-op batch / position / thread invariance at SD 1.5 shapes, fp32 and bf16.

For each op and shape: row 0 computed alone (batch 1) vs row 0 (and the same row placed last) inside
batches of 2, 3, 4, 8, 16 (other rows other data); and the same call at 1 vs 2 threads.
Prints '=' when bitwise equal, else the max abs diff.

usage: op_micro.py [fp32|bf16] [groups, comma separated: linear,bmm,conv,gn,ln,sdpa,elt]
"""
import sys
import torch
import torch.nn.functional as F

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import cpu_kind  # noqa: E402

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[1] if len(sys.argv) > 1 else "fp32"]
GROUPS = (sys.argv[2] if len(sys.argv) > 2 else "linear,bmm,conv,gn,ln,sdpa,elt").split(",")
BATCHES = (2, 3, 4, 8, 16)
torch.set_num_threads(2)
CL = torch.channels_last


def rows(shape, n, seed0=0, fmt=None):
    """n rows [1, *shape], row i from seed i: row 0 is the same in every batch."""
    out = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed0 + i)) for i in range(n)])
    out = out.to(DT)
    return out.contiguous(memory_format=fmt) if fmt is not None else out


def c(a, b):
    if torch.equal(a, b):
        return "="
    return f"{(a.float() - b.float()).abs().max().item():.1e}"


def check(name, fn, make, bdim=0, rowlen=1, batches=BATCHES):
    """fn(inputs) -> out; make(n) -> inputs for n rows (row 0 fixed). Row r is out.narrow(bdim, r*rowlen, rowlen)."""
    ref = fn(make(1))
    cells = []
    for b in batches:
        out = fn(make(b))
        r0 = out.narrow(bdim, 0, rowlen)
        cells.append(f"b{b}:{c(r0, ref)}")
    # position: the reference row placed last in a batch of 4 (roll the rows)
    inp = make(4)
    if isinstance(inp, torch.Tensor):
        inp = (inp,)
    rolled = tuple(t.roll(-1 * rowlen, bdim).contiguous(memory_format=CL if t.ndim == 4 and t.is_contiguous(memory_format=CL) and not t.is_contiguous() else torch.contiguous_format)
                   if isinstance(t, torch.Tensor) and t.shape[bdim] == 4 * rowlen * (t.shape[bdim] // (4 * rowlen)) and t.shape[bdim] >= 4 * rowlen else t
                   for t in inp)
    out = fn(rolled if len(rolled) > 1 else rolled[0])
    cells.append(f"last-of-4:{c(out.narrow(bdim, 3 * rowlen, rowlen), ref)}")
    torch.set_num_threads(1)
    ref1 = fn(make(1))
    out4_1 = fn(make(4))
    torch.set_num_threads(2)
    out4 = fn(make(4))
    cells.append(f"thr1v2@b1:{c(ref1, ref)}")
    cells.append(f"thr1v2@b4:{c(out4_1, out4)}")
    print(f"  {name:58s} " + " ".join(cells), flush=True)


print(cpu_kind(), "dtype", DT)
torch.manual_seed(0)

if "linear" in GROUPS:
    print("F.linear: X [B*T, K] (or [B, T, K]) @ W[N, K]^T + b; row 0 = the first T rows")
    for (k, n, t, where) in [(320, 1280, 1, "time_embed.0 (M=B)"), (1280, 1280, 1, "time_embed.2 / emb_layers (M=B)"),
                             (1280, 320, 1, "emb_layers 320 (M=B)"), (1280, 1280, 1, "tokens 1 (64px mid)"),
                             (1280, 1280, 4, "tokens 4"), (1280, 1280, 16, "tokens 16 (1280 ch)"),
                             (640, 640, 64, "tokens 64"), (320, 320, 256, "tokens 256"),
                             (768, 320, 77, "to_k/to_v (context)"), (768, 1280, 77, "to_k/to_v 1280"),
                             (320, 320, 1024, "tokens 1024 (256px level 0)"), (320, 2560, 1024, "GEGLU proj 1024"),
                             (1280, 320, 1024, "ff.net.2 1024"), (320, 320, 4096, "tokens 4096 (512px level 0)"),
                             (512, 512, 1024, "VAE attn 32x32")]:
        w = torch.randn(n, k).to(DT) / k ** 0.5
        bias = torch.randn(n).to(DT)
        check(f"K={k} N={n} T={t} {where}", lambda x: F.linear(x, w, bias), lambda m: rows((t, k), m), rowlen=1)

if "bmm" in GROUPS:
    print("bmm (Winograd products): [16, B*tiles, Ci] @ [16, Ci, Co]; row 0 = the first `tiles` rows of dim 1")
    for (ci, co, tiles) in [(640, 640, 64), (1280, 1280, 16), (1280, 640, 64), (640, 320, 256), (960, 640, 256)]:
        u = torch.randn(16, co, ci).to(DT) / ci ** 0.5
        check(f"Ci={ci} Co={co} tiles={tiles}",
              lambda v: torch.bmm(v, u.transpose(1, 2)),
              lambda m: rows((16, tiles, ci), m).transpose(0, 1).reshape(16, m * tiles, ci),
              bdim=1, rowlen=tiles)

if "conv" in GROUPS:
    from batchsd.model.fast.packed_conv import PackedConv2d
    from batchsd.model.fast.winograd import WinogradConv2d
    print("convolutions [B, C, H, W] channels_last: F.conv2d / PackedConv2d (oneDNN packed) / WinogradConv2d")
    for (ci, co, hw, k) in [(4, 320, 32, 3), (320, 320, 32, 3), (320, 320, 64, 3), (640, 640, 16, 3), (1280, 1280, 8, 3),
                            (1280, 1280, 1, 3), (2560, 1280, 8, 3), (960, 640, 16, 1), (320, 4, 32, 3),
                            (512, 512, 32, 3), (128, 128, 128, 3), (512, 512, 64, 3)]:
        conv = torch.nn.Conv2d(ci, co, k, padding=k // 2).to(DT).to(memory_format=CL).eval().requires_grad_(False)
        for kind in ("plain", "packed", "winograd"):
            if kind == "winograd" and (k != 3):
                continue
            m = conv
            if kind != "plain":
                m = torch.nn.Conv2d(ci, co, k, padding=k // 2).to(DT).to(memory_format=CL).eval().requires_grad_(False)
                m.load_state_dict(conv.state_dict())
                m.__class__ = PackedConv2d if kind == "packed" else WinogradConv2d
                if kind == "winograd":
                    m.winograd = True
            with torch.inference_mode():
                check(f"{kind:8s} Ci={ci} Co={co} {hw}x{hw} k{k}", m, lambda b: rows((ci, hw, hw), b, fmt=CL),
                      batches=(2, 3, 4, 8))

if "gn" in GROUPS:
    print("group_norm(32 groups) [B, C, H, W]: channels_last and contiguous")
    for (ch, hw) in [(320, 8), (320, 16), (320, 31), (320, 32), (640, 32), (320, 64), (128, 64), (512, 64), (128, 128), (256, 128), (128, 256)]:
        gn = torch.nn.GroupNorm(32, ch, eps=1e-5).to(DT)
        with torch.no_grad():
            gn.weight.normal_(1, 0.1), gn.bias.normal_(0, 0.1)
        for fmt in (CL, torch.contiguous_format):
            with torch.inference_mode():
                check(f"{'cl' if fmt is CL else 'nchw'} C={ch} {hw}x{hw} (HxW={hw*hw})", gn,
                      lambda b: rows((ch, hw, hw), b, fmt=fmt), batches=(2, 3, 4, 8) if hw <= 64 else (2, 3))

if "ln" in GROUPS:
    print("layer_norm [B, T, C]")
    for (ch, t) in [(320, 1024), (640, 256), (1280, 64), (1280, 1), (768, 77), (320, 4096)]:
        ln = torch.nn.LayerNorm(ch).to(DT)
        with torch.inference_mode():
            check(f"C={ch} T={t}", ln, lambda b: rows((t, ch), b))

if "sdpa" in GROUPS:
    print("scaled_dot_product_attention q [B, heads, N, d], k/v [B, heads, M, d]")
    for (heads, n, m, d) in [(8, 1, 1, 160), (8, 4, 4, 160), (8, 16, 16, 160), (8, 64, 64, 80), (8, 256, 256, 80),
                             (8, 1024, 1024, 40), (8, 1024, 77, 40), (8, 64, 77, 160), (8, 1, 77, 160),
                             (1, 1024, 1024, 512), (8, 4096, 77, 40)]:
        def make(b, n=n, m=m, d=d, heads=heads):
            return (rows((heads, n, d), b, 0), rows((heads, m, d), b, 100), rows((heads, m, d), b, 200))
        with torch.inference_mode():
            check(f"heads={heads} N={n} M={m} d={d}", lambda qkv: F.scaled_dot_product_attention(*qkv), make,
                  batches=(2, 3, 4, 8) if n < 4096 else (2,))

if "elt" in GROUPS:
    print("elementwise: silu / gelu / exp-based on contiguous [B, ...] and on the strided GEGLU gate view")
    for shape in [(1, 5120), (4, 5120), (64, 5120), (1024, 2560), (320, 32, 32), (1280, 1, 1), (77, 768), (3, 7)]:
        check(f"silu {shape}", F.silu, lambda b: rows(shape, b))
        check(f"gelu {shape}", F.gelu, lambda b: rows(shape, b))
        check(f"sigmoid {shape}", torch.sigmoid, lambda b: rows(shape, b))
    for (t, inner) in [(1, 5120), (4, 5120), (64, 2560), (1024, 1280)]:
        check(f"gelu(chunk gate) T={t} inner={inner}", lambda x: F.gelu(x.chunk(2, dim=-1)[1]),
              lambda b: rows((t, 2 * inner), b))
