"""bf16 F.linear: which M (rows per call) change row 0's bits; big N so that 1-ulp differences show."""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import cpu_kind
print(cpu_kind())
Ms = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 77, 128, 154, 1024, 2048]
for (k, n) in [(320, 5120), (1280, 5120), (5120, 1280), (768, 2560)]:
    g = torch.Generator().manual_seed(k + n)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16); b = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16)
    x = torch.randn(max(Ms), k, generator=g).to(torch.bfloat16)
    for thr in (2, 1):
        torch.set_num_threads(thr)
        ref = F.linear(x[:1], w, b)[0]
        refbig = F.linear(x[:64], w, b)[0]
        cells = []
        for m in Ms:
            r0 = F.linear(x[:m], w, b)[0]
            cells.append(f"{m}:{(r0 != ref).sum().item()}/{(r0 != refbig).sum().item()}")
        print(f"K={k} N={n} thr={thr}  M:#elements of row 0 differing from M=1 / from M=64: " + " ".join(cells), flush=True)
torch.set_num_threads(2)
