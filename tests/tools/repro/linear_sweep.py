"""Equivalence classes of row 0 of F.linear over M (rows in the call), fp32 and bf16, 2D and 3D inputs, threads 1/2."""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import cpu_kind
print(cpu_kind())
Ms = list(range(1, 33)) + [48, 64, 77, 128, 154, 256, 1024, 2048, 4096]
for dt in (torch.float32, torch.bfloat16):
    for (k, n) in [(320, 1280), (1280, 1280), (1280, 320), (768, 640), (320, 2560)]:
        g = torch.Generator().manual_seed(k + n)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dt); b = torch.randn(n, generator=g).to(dt)
        x = torch.randn(max(Ms), k, generator=g).to(dt)
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for form in ("2d", "3d[M,1,K]", "3d[1,M,K]"):
                classes, label = [], []
                for m in Ms:
                    xm = x[:m]
                    if form == "3d[M,1,K]": xm = xm.unsqueeze(1)
                    if form == "3d[1,M,K]": xm = xm.unsqueeze(0)
                    r0 = F.linear(xm, w, b).reshape(m, n)[0]
                    for i, c in enumerate(classes):
                        if torch.equal(c, r0): label.append(i); break
                    else:
                        classes.append(r0); label.append(len(classes) - 1)
                runs, start = [], 0
                for i in range(1, len(Ms) + 1):
                    if i == len(Ms) or label[i] != label[start]:
                        runs.append(f"M={Ms[start]}" + (f"..{Ms[i-1]}" if i - 1 > start else "") + f":c{label[start]}"); start = i
                print(f"{str(dt)[6:]:8s} K={k:4d} N={n:4d} thr={threads} {form:10s} {len(classes)} classes: {' '.join(runs)}", flush=True)
        torch.set_num_threads(2)
