"""Thread dependence op by op inside a real UNet forward (full model), with the exact-mode patches on:
record every compute op at 2 threads (noting ops that the patches pinned to 1 thread), then re-run each
non-pinned op on its recorded inputs at 3, 5 and 8 threads and compare. usage: thread_trace.py DTYPE HW BATCH [part]"""
import sys, torch
from collections import defaultdict
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import exact
from op_trace import SKIP, base, opname, snap, build, PROMPTS, ModuleStack, run
from common import cpu_kind

class Rec(TorchDispatchMode):
    def __init__(self, where):
        super().__init__(); self.ops = []; self.where = where
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if base(func) in SKIP:
            return func(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        saved = [snap(x) for x in leaves]
        out = func(*args, **kwargs)
        o = out if isinstance(out, torch.Tensor) else tree_flatten(out)[0][0]
        self.ops.append((func, saved, spec, snap(o), self.where.top(), torch.get_num_threads()))
        return out

dt, hw, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
part = sys.argv[4] if len(sys.argv) > 4 else "unet"
print(cpu_kind()); print(f"dtype {dt} latent {hw} batch {b} part {part}, exact patches (rowwise) on")
torch.set_num_threads(2)
pipe = build("full", dt, "winograd" if dt == "bf16" else "packed")
exact.patch_functions("rowwise")
with torch.inference_mode():
    ctx = torch.cat([pipe.family.encode_text(pipe.model, [p], pipe.device)[0] for p in PROMPTS])[:b]
    x = torch.randn(b, 4, hw, hw, generator=torch.Generator().manual_seed(0)).to(pipe.dtype).contiguous(memory_format=pipe.memory_format)
    if part == "unet":
        mod = pipe.model.unet; call = lambda: mod(x, torch.full((b,), 500.0), ctx)
    else:
        mod = pipe.model.vae; call = lambda: mod.decode(x)
    call()
    rec = Rec(ModuleStack(mod))
    with rec:
        call()
    res = defaultdict(list)
    for func, saved, spec, out, where, nthr in rec.ops:
        if nthr == 1:
            res[(opname(func), "pinned")].append(None); continue
        for t in (3, 5, 8):
            torch.set_num_threads(t)
            o = run(func, [snap(s) for s in saved], spec)
            torch.set_num_threads(2)
            if not torch.equal(o, out):
                res[(opname(func), where, tuple(next(s for s in saved if isinstance(s, torch.Tensor)).shape))].append(
                    (t, (o.float() - out.float()).abs().max().item()))
    for k, v in res.items():
        if k[1] == "pinned":
            print(f"  {k[0]:32s} pinned to 1 thread by the patches: {len(v)} calls")
    bad = {k: v for k, v in res.items() if k[1] != "pinned"}
    print(f"non-pinned ops differing at 3/5/8 threads vs 2: {len(bad)}")
    for k, v in bad.items():
        print(f"  {k}: {v}")
    print(f"{len(rec.ops)} ops checked")
