"""Reproduce: a row's latents alone vs inside batches, and threads 1 vs 2 (public API)."""
import sys, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import cmp, cpu_kind, CKPT
from batchsd import Pipeline, GenerationRow

model = sys.argv[1] if len(sys.argv) > 1 else "tiny"
size = int(sys.argv[2]) if len(sys.argv) > 2 else 64
print(cpu_kind())
pipe = Pipeline.load(model if model == "tiny" else CKPT, device="cpu", dtype="fp32")
prompts = ["a cat", "a dog on a hill", "a red car", "mountains at dusk", "a bowl of fruit", "an astronaut", "a city", "waves"]
rows = [GenerationRow(p, negative_prompt="blurry", seed=10 + i, steps=3, cfg_scale=7.5, sampler="euler_a",
                      width=size, height=size) for i, p in enumerate(prompts)]
torch.set_num_threads(2)
ref = pipe.generate(rows[:1]).latents
for b in (2, 3, 4, 8):
    out = pipe.generate(rows[:b]).latents
    print(f"batch {b}: row0 vs alone {cmp(out[0], ref[0])}")
torch.set_num_threads(1)
out = pipe.generate(rows[:1]).latents
print(f"threads 1 vs 2, batch 1: {cmp(out[0], ref[0])}")
