"""Op-by-op batch and thread dependence of the UNet (and text encoder / VAE decoder), at the aten level.

Method. A TorchDispatchMode records every compute op of a reference forward at batch 1 (inputs cloned
before the op, output after). Then the same module runs at batch B (row 0 = the reference row, the
other rows other inputs); at every op the mode builds the op's inputs with row 0's slice replaced by
the reference inputs (exactly the same bits for row 0), runs the op on them, and compares row 0's
slice of the output with the reference output: that is the op's own batch dependence, free of
anything upstream. The live forward continues with the live op's output. Thread dependence: the
reference op re-run at 1 thread vs the reference at 2 threads (batch 1), and the batch-B op at 1
vs 2 threads.

usage: op_trace.py MODEL(tiny|full) DTYPE(fp32|bf16) MODE(packed|plain|winograd) LATENT_HW BATCHES [PART]
PART: unet (default) | text | vae
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import CKPT, cpu_kind  # noqa: E402

SKIP = {"view", "_unsafe_view", "permute", "transpose", "t", "expand", "slice", "select", "unsqueeze",
        "squeeze", "as_strided", "detach", "alias", "split", "split_with_sizes", "chunk", "unbind",
        "_reshape_alias", "lift_fresh", "empty", "empty_like", "new_empty", "new_empty_strided",
        "empty_strided", "sym_size", "sym_stride", "is_same_size", "_local_scalar_dense", "zeros",
        "arange", "full", "scalar_tensor", "_to_copy", "copy_", "clone", "cat", "stack", "index",
        "index_put_", "fill_", "zero_", "lift_fresh_copy", "constant_pad_nd", "_unsafe_index", "expand_as",
        "narrow", "reshape", "contiguous", "to", "slice_scatter", "repeat", "_reorder_convolution_weight"}


def opname(func) -> str:
    return func._schema.name.split("::")[-1] + ("." + func._overloadname if func._overloadname != "default" else "")


def base(func) -> str:
    return func._schema.name.split("::")[-1]


def snap(t):
    if isinstance(t, torch.Tensor) and t.layout == torch.strided:
        c = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
        c.copy_(t)
        return c
    return t


class ModuleStack:
    def __init__(self, root: torch.nn.Module):
        self.stack = ["-"]
        for name, m in root.named_modules():
            m.register_forward_pre_hook(lambda m, a, n=name: self.stack.append(n or 'root'))
            m.register_forward_hook(lambda m, a, o: (self.stack.pop(), None)[1])

    def top(self):
        return self.stack[-1]


class Recorder(TorchDispatchMode):
    def __init__(self, where):
        super().__init__()
        self.trace, self.where = [], where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if base(func) in SKIP:
            return func(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        saved = [snap(x) for x in leaves]
        out = func(*args, **kwargs)
        self.trace.append((func, saved, spec, snap(out if isinstance(out, torch.Tensor) else tree_flatten(out)[0][0]),
                           self.where.top()))
        return out


def batch_dim(live: torch.Tensor, ref: torch.Tensor):
    if live.shape == ref.shape:
        return None
    ds = [d for d in range(live.ndim) if live.shape[d] != ref.shape[d]]
    assert len(ds) == 1 and live.ndim == ref.ndim, (live.shape, ref.shape)
    return ds[0]


def run(func, leaves, spec):
    args, kwargs = tree_unflatten(leaves, spec)
    out = func(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else tree_flatten(out)[0][0]


def cmp_row(out, ref_out):
    d = batch_dim(out, ref_out)
    row = out if d is None else out.narrow(d, 0, ref_out.shape[d])
    if torch.equal(row, ref_out):
        return 0.0
    return (row.float() - ref_out.float()).abs().max().item() or 1e-30   # NaN-free; tiny>0 for -0/+0


class Replayer(TorchDispatchMode):
    def __init__(self, ref, where, threads_check: bool):
        super().__init__()
        self.ref, self.i, self.where, self.threads_check = ref, 0, where, threads_check
        self.results = []     # (op, where, shape, batch diff, thread diff at B, thread diff at 1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if base(func) in SKIP:
            return func(*args, **kwargs)
        rfunc, rleaves, rspec, rout, rwhere = self.ref[self.i]
        self.i += 1
        assert rfunc == func, (rfunc, func)
        leaves, spec = tree_flatten((args, kwargs))
        sub = []
        for x, r in zip(leaves, rleaves):
            if isinstance(x, torch.Tensor) and x.layout == torch.strided:
                d = batch_dim(x, r)
                if d is not None:
                    c = snap(x)
                    c.narrow(d, 0, r.shape[d]).copy_(r)
                    x = c
                elif func._schema.is_mutable:
                    x = snap(x)
            sub.append(x)
        in_shape = tuple(next(x for x in rleaves if isinstance(x, torch.Tensor)).shape)   # batch-1 shape
        sub1 = [snap(x) for x in sub] if self.threads_check else None
        out_b = run(func, sub, spec)                     # batch B, row 0 = reference inputs, 2 threads
        bdiff = cmp_row(out_b, rout)
        tdiff_b = tdiff_1 = None
        if self.threads_check:
            torch.set_num_threads(1)
            try:
                out_b1 = run(func, sub1, spec)             # same batch-B inputs, 1 thread
                out_11 = run(func, [snap(x) for x in rleaves], rspec)   # reference inputs, 1 thread
            finally:
                torch.set_num_threads(2)
            tdiff_b = 0.0 if torch.equal(out_b1, out_b) else (out_b1.float() - out_b.float()).abs().max().item() or 1e-30
            tdiff_1 = cmp_row(out_11, rout)
        self.results.append((opname(func), rwhere, in_shape, bdiff, tdiff_b, tdiff_1))
        return func(*args, **kwargs)


def build(model_name, dtype_name, mode):
    from batchsd import Pipeline
    from batchsd.model.checkpoint import load_model
    from batchsd.model.config import TINY
    from batchsd.model.family import FAMILIES, SD1
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    kw = dict(pack_weights=mode != "plain", winograd=(mode == "winograd"))
    if model_name == "tiny":
        m, fam = SD1.model_class.random(TINY, seed=0), SD1
    else:
        m, info = load_model(CKPT, device="cpu", dtype=dt, memory_format=torch.channels_last)
        fam = FAMILIES[info.family]
    return Pipeline(m, torch.device("cpu"), dt, name=model_name, family=fam, **kw)


PROMPTS = ["a cat", "a dog on a hill", "a red car", "mountains at dusk", "a bowl of fruit", "an astronaut",
           "a city at night", "waves"]


def main():
    model_name, dtype_name, mode, hw = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    batches = [int(b) for b in sys.argv[5].split(",")]
    part = sys.argv[6] if len(sys.argv) > 6 else "unet"
    torch.set_num_threads(2)
    print(cpu_kind())
    print(f"model {model_name} dtype {dtype_name} mode {mode} latent {hw}x{hw} batches {batches} part {part}")
    t0 = time.time()
    pipe = build(model_name, dtype_name, mode)
    dt, cl = pipe.dtype, pipe.memory_format
    with torch.inference_mode():
        ctx = torch.cat([pipe.family.encode_text(pipe.model, [p], pipe.device)[0] for p in PROMPTS])   # each alone
        bmax = max(batches)
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(bmax, 4, hw, hw, generator=g)
        if part == "unet":
            module = pipe.model.unet
            ctxs = ctx.repeat(2, 1, 1)[:bmax] if bmax > len(PROMPTS) else ctx[:bmax]
            call = lambda b: module(xs[:b].to(dt).contiguous(memory_format=cl),
                                    torch.full((b,), 500.0), ctxs[:b])
        elif part == "vae":
            module = pipe.model.vae
            call = lambda b: module.decode(xs[:b].to(dt).contiguous(memory_format=cl))
        else:   # text encoder: prompt token ids
            from batchsd.model.tokenizer import tokenize
            module = pipe.model.text_encoder
            ids = tokenize(PROMPTS)[0]
            call = lambda b: module(ids[:b])
        call(1)   # warm-up: packs the 1x1 convs, builds derived (folded / Winograd) weights
        where = ModuleStack(module)
        rec = Recorder(where)
        with rec:
            ref_out = call(1)
        print(f"reference: {len(rec.trace)} compute ops ({time.time() - t0:.1f}s)")
        table = defaultdict(lambda: defaultdict(list))     # op -> key -> diffs
        examples = {}
        detail = defaultdict(lambda: defaultdict(lambda: {'n': 0, 'cols': defaultdict(list), 'where': set()}))
        for b in batches:
            rep = Replayer(rec.trace, where, threads_check=(b == batches[0]))
            with rep:
                out = call(b)
            assert rep.i == len(rec.trace)
            e2e = cmp_row(out, ref_out)
            print(f"batch {b}: module output row 0 vs batch 1: {'=' if e2e == 0 else f'{e2e:.2e}'} ({time.time() - t0:.1f}s)")
            for op, w, shape, bd, tb, t1 in rep.results:
                key = shape
                dd = detail[op][key]
                if b == batches[0]:
                    dd['n'] += 1
                dd['where'].add(w)
                dd['cols'][f'batch{b}'].append(bd)
                if tb is not None:
                    dd['cols']['thr@1'].append(t1)
                    dd['cols']['thr@B'].append(tb)
                table[op][f"batch{b}"].append(bd)
                if bd and (op, f"batch{b}") not in examples:
                    examples[(op, f"batch{b}")] = (w, shape, bd)
                if tb is not None:
                    table[op]["thr@B"].append(tb)
                    table[op]["thr@1"].append(t1)
                    if t1 and (op, "thr@1") not in examples:
                        examples[(op, "thr@1")] = (w, shape, t1)
                    if tb and (op, "thr@B") not in examples:
                        examples[(op, "thr@B")] = (w, shape, tb)
        cols = [f"batch{b}" for b in batches] + ["thr@1", f"thr@B"]
        print(f"\nper op: variant calls/total calls (max abs diff of row 0); thr@1 = 1 vs 2 threads at batch 1, "
              f"thr@B = at batch {batches[0]}")
        print("| op | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for op in sorted(table):
            cells = []
            for c in cols:
                v = table[op][c]
                nz = [x for x in v if x]
                cells.append(f"{len(nz)}/{len(v)}" + (f" ({max(nz):.1e})" if nz else ""))
            print(f"| {op} | " + " | ".join(cells) + " |")
        print("\nper op and batch-1 input shape: where variant (max diff per column), else invariant:")
        for op in sorted(detail):
            for shape in sorted(detail[op], key=str):
                d = detail[op][shape]
                var = {c: max(v) for c, v in d["cols"].items() if max(v)}
                mods = sorted(d["where"])
                print(f"  {op:30s} {str(shape):22s} n={d['n']:3d} {'INVARIANT' if not var else ' '.join(f'{c}:{v:.1e}' for c, v in var.items())}"
                      f"   e.g. {mods[0]}")
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
