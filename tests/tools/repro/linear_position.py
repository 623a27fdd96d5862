"""fp32/bf16 F.linear: does row p of an M-row call equal the same row computed at position 0 of a 64-row call?
Prints, per M, the positions p whose bits differ (a map of MKL's / oneDNN's M blocking)."""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import cpu_kind
print(cpu_kind())
torch.set_num_threads(2)
for dt in (torch.float32, torch.bfloat16):
    for (k, n) in [(320, 1280), (1280, 1280), (1280, 5120)]:
        g = torch.Generator().manual_seed(1)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dt); b = (torch.randn(n, generator=g) * 0.01).to(dt)
        rows = torch.randn(64, k, generator=g).to(dt)
        # reference of each row: alone at position 0 of a 64-row call whose other rows are the others
        ref = F.linear(rows, w, b)
        out = []
        for m in list(range(1, 41)) + [48, 63, 64, 65, 100, 128, 129]:
            bad = []
            for p in range(min(m, 64)):
                x = torch.zeros(m, k, dtype=dt)
                x[p] = rows[p]
                if m > 1:
                    others = [i for i in range(m) if i != p]
                    x[others] = torch.randn(len(others), k, generator=g).to(dt)
                if not torch.equal(F.linear(x, w, b)[p], ref[p]):
                    bad.append(p)
            out.append(f"M={m}:" + ("ok" if not bad else ",".join(map(str, bad)) if len(bad) < 12 else f"{len(bad)} rows ({bad[0]}..{bad[-1]})"))
        print(f"{str(dt)[6:]} K={k} N={n} (vs row at position p of M=64): " + " ".join(out), flush=True)
