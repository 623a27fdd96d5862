"""Which op makes a row's UNet result depend on its position in the CFG batch?

Run A: one batched UNet forward in the pipeline's CFG layout [uncond of guided rows, cond of all rows].
Run B: per row, its own pair [uncond_r, cond_r] (or [cond_r] when unguided). Every compute op's inputs
and output are recorded; row r's slices are compared op by op, and the ops whose row inputs are equal
but whose row outputs differ are reported (the origins of the differences).

usage: debug_positions.py MODEL DTYPE LATENT_HW N_ROWS GUIDED_MASK(e.g. 11011) STRATEGY(current|batched)
"""
import sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import exact  # noqa: E402
from op_trace import SKIP, base, opname, snap, build, PROMPTS, ModuleStack  # noqa: E402
SKIP.update({"new_zeros", "zeros_like"})


class Rec(TorchDispatchMode):
    def __init__(self, where):
        super().__init__()
        self.ops, self.where = [], where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if base(func) in SKIP:
            return func(*args, **kwargs)
        leaves = [snap(x) for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor) and x.layout == torch.strided]
        out = func(*args, **kwargs)
        o = out if isinstance(out, torch.Tensor) else tree_flatten(out)[0][0]
        self.ops.append((opname(func), leaves, snap(o), self.where.top()))
        return out


def row_slice(t, nb, pos, ref_n):
    """t has batch nb somewhere (a dim whose size is nb*k where the reference has ref_n*k)."""
    return t, pos


def main():
    model, dt, hw, n, mask, strategy = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
    guided = [i for i in range(n) if mask[i] == "1"]
    torch.set_num_threads(2)
    pipe = build(model, dt, "winograd" if dt == "bf16" else "packed")
    if strategy == "batched":
        exact.patch_functions("batched"); exact.STRATEGY["s"] = "debug"   # SDPA N=1: pinned, not split per row
    dtype, cl = pipe.dtype, pipe.memory_format
    with torch.inference_mode():
        ctx = torch.cat([pipe.family.encode_text(pipe.model, [p], pipe.device)[0] for p in PROMPTS])
        unc = torch.cat([pipe.family.encode_text(pipe.model, [""], pipe.device)[0]] * len(PROMPTS))
        x = torch.randn(n, 4, hw, hw, generator=torch.Generator().manual_seed(0))
        where = ModuleStack(pipe.model.unet)

        def fwd(xb, cb):
            return pipe.unet(xb.to(dtype).contiguous(memory_format=cl), torch.full((xb.shape[0],), 500.0), cb)
        fwd(x[:1], ctx[:1])
        idx = torch.tensor(guided, dtype=torch.long)
        xa = torch.cat([x[idx], x]) if guided else x
        ca = torch.cat([unc[idx], ctx[:n]]) if guided else ctx[:n]
        A = Rec(where)
        with A:
            fwd(xa, ca)
        nb = xa.shape[0]
        for r in range(n):
            pair = [("u", guided.index(r)), ("c", len(guided) + r)] if r in guided else [("c", len(guided) + r)]
            xb = torch.cat([x[r:r + 1]] * len(pair))
            cb = torch.cat(([unc[r:r + 1]] if r in guided else []) + [ctx[r:r + 1]])
            B = Rec(where)
            with B:
                fwd(xb, cb)
            assert len(A.ops) == len(B.ops), (len(A.ops), len(B.ops))
            origins = []
            first_diff = None
            for i, ((na, la, oa, wa), (nbn, lb, ob, wb)) in enumerate(zip(A.ops, B.ops)):
                def sl(ta, tb):
                    if ta.ndim != tb.ndim:
                        ta, tb = ta.reshape(-1, ta.shape[-1]), tb.reshape(-1, tb.shape[-1])
                    if ta.shape == tb.shape:
                        return [(ta, tb)]
                    d = [k for k in range(ta.ndim) if ta.shape[k] != tb.shape[k]][0]
                    ka = ta.shape[d] // nb if ta.shape[d] % nb == 0 else 1          # padded to 4 rows: 1
                    kb = tb.shape[d] // len(pair) if tb.shape[d] % len(pair) == 0 and tb.shape[d] != 4 else 1
                    if ka != kb:
                        ka = kb = min(ka, kb)
                    return [(ta.narrow(d, pa * ka, ka), tb.narrow(d, j * kb, kb)) for j, (_, pa) in enumerate(pair)]
                ins_equal = all(torch.equal(a, b) for ta, tb in zip(la, lb) for a, b in sl(ta, tb))
                out_pairs = sl(oa, ob)
                out_equal = all(torch.equal(a, b) for a, b in out_pairs)
                if not out_equal and first_diff is None:
                    first_diff = (i, na, wa)
                if ins_equal and not out_equal:
                    d = max((a.float() - b.float()).abs().max().item() for a, b in out_pairs)
                    origins.append(f"{i}:{na}@{wa} in {tuple(lb[0].shape)} diff {d:.1e}")
            print(f"row {r} {'guided' if r in guided else 'unguided'} positions {pair}: first differing op {first_diff}; "
                  f"{len(origins)} origin ops: {origins[:6]}")


if __name__ == "__main__":
    main()
