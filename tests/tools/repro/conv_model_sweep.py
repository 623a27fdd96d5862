"""Every oneDNN convolution of the full-width UNet (and VAE decoder) at a given latent size and batch:
bits at intra-op threads 1,2,3,4,6,8,16 (above 2 oversubscribes this VM: correctness only).
usage: conv_model_sweep.py DTYPE LATENT_HW BATCH [unet|vae]"""
import sys, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import cpu_kind
from op_trace import build, PROMPTS
print(cpu_kind())
dt, hw, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
part = sys.argv[4] if len(sys.argv) > 4 else "unet"
THREADS = (1, 2, 3, 4, 6, 8, 16)
torch.set_num_threads(2)
pipe = build("full", dt, "winograd" if dt == "bf16" else "packed")
mod = pipe.model.unet if part == "unet" else pipe.model.vae.decoder
calls = []
from batchsd.model.fast.packed_conv import PackedConv2d
hooks = []
for name, m in mod.named_modules():
    if isinstance(m, PackedConv2d) and not getattr(m, "winograd", False):
        hooks.append(m.register_forward_pre_hook(lambda m, a, n=name: calls.append((n, m, a[0].clone(memory_format=torch.preserve_format)))))
# folded upsample convs are not submodules: hook the folded conv objects after the first call
with torch.inference_mode():
    x = torch.randn(b, 4, hw, hw, generator=torch.Generator().manual_seed(0)).to(pipe.dtype).contiguous(memory_format=pipe.memory_format)
    ctx = torch.cat([pipe.family.encode_text(pipe.model, [p], pipe.device)[0] for p in PROMPTS])[:b]
    f = (lambda: mod(x, torch.full((b,), 500.0), ctx)) if part == "unet" else (lambda: mod(x))
    f()
    calls.clear()
    for name, m in mod.named_modules():
        if hasattr(m, "folded_conv") and m._derived is not None:
            fc = m._derived[1]
            hooks.append(fc.register_forward_pre_hook(lambda mm, a, n=name + ".folded": calls.append((n, mm, a[0].clone(memory_format=torch.preserve_format)))))
    f()
    seen, bad = set(), 0
    for name, m, inp in calls:
        key = (tuple(inp.shape), m.in_channels, m.out_channels, m.kernel_size, m.stride)
        if key in seen:
            continue
        seen.add(key)
        outs = {}
        for t in THREADS:
            torch.set_num_threads(t)
            outs[t] = m(inp)
        torch.set_num_threads(2)
        diff = [t for t in THREADS if not torch.equal(outs[t], outs[1])]
        if diff:
            bad += 1
        print(f"  {name:40s} in {tuple(inp.shape)} k{m.kernel_size[0]}s{m.stride[0]} -> {m.out_channels}: "
              f"{'differs at T=' + str(diff) if diff else 'invariant'}", flush=True)
    print(f"{dt} {part} latent {hw} batch {b}: {bad} of {len(seen)} distinct conv shapes thread-dependent (T in {THREADS})")
