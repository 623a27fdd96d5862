"""Text encoder (full-width CLIP, fp32 and bf16): one prompt at intra-op threads 1..8, current code vs
with the exact-mode thread pins (sigmoid of QuickGELU on 1 thread)."""
import sys, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import exact
from common import CKPT, cpu_kind
from batchsd.model.checkpoint import load_model
from batchsd.model.tokenizer import tokenize
print(cpu_kind())
for dt in (torch.float32, torch.bfloat16):
    m, _ = load_model(CKPT, device="cpu", dtype=dt)
    te = m.text_encoder.eval()
    ids = tokenize(["a photo of an astronaut riding a horse", "a cat"])[0]
    for label in ("current", "pinned"):
        if label == "pinned":
            exact.patch_functions("rowwise")
        outs = {}
        with torch.inference_mode():
            for t in (1, 2, 3, 5, 6, 8):
                torch.set_num_threads(t)
                outs[t] = te(ids[:1]), te(ids)[:1]
        torch.set_num_threads(2)
        exact.disable_exact()
        cells = [f"T{t}:{'=' if torch.equal(outs[t][0], outs[1][0]) else f'{(outs[t][0]-outs[1][0]).abs().max().item():.1e}'}"
                 f"/{'=' if torch.equal(outs[t][1], outs[1][0]) else 'batch2 differs'}" for t in outs]
        print(str(dt), label, "prompt alone at T vs T1 / with another prompt at T vs alone at T1:", " ".join(cells), flush=True)
    del m, te
