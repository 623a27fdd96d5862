import sys, time, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import CKPT
from batchsd import Pipeline, GenerationRow
from batchsd.model import samplers
pipe = Pipeline.load(CKPT, device="cpu", dtype="fp32")
rows = [GenerationRow(f"p{i}", negative_prompt="blurry", seed=i, steps=3, cfg_scale=7.5, sampler="euler_a", width=64, height=64) for i in range(8)]
for b in (1, 1, 3, 3, 4, 8):
    t = time.perf_counter(); pipe.generate(rows[:b]); print(b, f"{time.perf_counter()-t:.2f}s", flush=True)
with torch.profiler.profile() as prof:
    pipe.generate(rows[:3])
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
