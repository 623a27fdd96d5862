"""End-to-end check of the exact-mode prototype (exact.py) through the public API.

The same rows run with batch sizes 1/3/4/8 and intra-op thread counts 1/2/3 (3 oversubscribes this
2-core VM; correctness only), under: the current code ("current"), exact mode "rowwise" and exact
mode "batched". Each row's latents (torch.equal) and PNG-equivalent image bytes are compared with the
same row at batch 1, 2 threads, of the same mode. The text cache is cleared before every config (as
a fresh process, a shard or a resume would start).

usage: verify_exact.py MODEL(tiny|full) SIZE STEPS DTYPE(fp32|bf16) [modes] [configs b:T,...]
"""
import hashlib
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import exact  # noqa: E402
from common import CKPT, cpu_kind  # noqa: E402
from batchsd import GenerationRow, Pipeline  # noqa: E402

model = sys.argv[1]
size, steps = int(sys.argv[2]), int(sys.argv[3])
dtype = sys.argv[4]
modes = (sys.argv[5] if len(sys.argv) > 5 else "current,rowwise,batched").split(",")
configs = [tuple(int(v) for v in c.split(":")) for c in
           (sys.argv[6] if len(sys.argv) > 6 else "1:2,3:2,4:2,8:2,1:1,8:1,3:3,4:3").split(",")]
torch.set_num_threads(2)
print(cpu_kind())
print(f"model {model} {size}x{size} steps {steps} dtype {dtype} modes {modes} configs (batch:threads) {configs}")

prompts = ["a cat", "a dog on a hill", "a red car", "mountains at dusk", "a bowl of fruit", "an astronaut",
           "a city at night", "waves", "a forest", "a robot"]
negs = ["blurry", "", "low quality", "blurry"]
init = [Image.fromarray((np.random.RandomState(s).rand(size, size, 3) * 255).astype("uint8")) for s in range(3)]
groups = {
    "euler_a": [GenerationRow(prompts[i], negative_prompt=negs[i % 4], seed=100 + i, steps=steps,
                              cfg_scale=1.0 if i == 4 else 7.5, sampler="euler_a", width=size, height=size)
                for i in range(8)],
    "dpmpp_2m_karras": [GenerationRow(prompts[i + 2], negative_prompt=negs[i % 4], seed=200 + i, steps=steps,
                                      cfg_scale=5.0 + i, sampler="dpmpp_2m_karras", width=size, height=size)
                        for i in range(8)],
    "img2img": [GenerationRow(prompts[i + 5], negative_prompt="blurry", seed=300 + i, steps=steps + 1, cfg_scale=7.5,
                              init_image=init[i % 3], strength=0.6, sampler="euler_a", width=size, height=size)
                for i in range(4)],
}

if len(sys.argv) > 7:     # rows per group, e.g. 3,0,1
    for key, n in zip(list(groups), sys.argv[7].split(",")):
        groups[key] = groups[key][:int(n)]
    groups = {k: v for k, v in groups.items() if v}
print("rows per group:", {k: len(v) for k, v in groups.items()})
t0 = time.time()
pipe = Pipeline.load("tiny" if model == "tiny" else CKPT, device="cpu", dtype=dtype)
print(f"loaded in {time.time() - t0:.1f}s")


def run_config(b, threads):
    torch.set_num_threads(threads)
    pipe._text_cache.clear()
    lat, img = {}, {}
    for key, rows in groups.items():
        for start in range(0, len(rows), b):
            out = pipe.generate(rows[start:start + b])
            for j, r in enumerate(rows[start:start + b]):
                lat[(key, start + j)] = out.latents[j].clone()
                img[(key, start + j)] = hashlib.sha256(out.images[j].tobytes()).hexdigest()
    torch.set_num_threads(2)
    return lat, img


summary = {}
ALL = {}
for mode in modes:
    if mode == "current":
        exact.restore(pipe)
    else:
        exact.restore(pipe)
        exact.enable_exact(pipe, mode)
    ref = None
    for (b, threads) in configs:
        t1 = time.time()
        lat, img = run_config(b, threads)
        ALL[(mode, b, threads)] = (lat, img)
        if ref is None:
            ref = (lat, img)
            print(f"[{mode}] reference = batch {b}, {threads} threads ({time.time() - t1:.1f}s)", flush=True)
            continue
        eq_lat = sum(torch.equal(lat[k], ref[0][k]) for k in lat)
        eq_img = sum(img[k] == ref[1][k] for k in img)
        maxd = max((lat[k] - ref[0][k]).abs().max().item() for k in lat)
        bad = sorted({k[0] for k in lat if not torch.equal(lat[k], ref[0][k])})
        print(f"[{mode}] batch {b} threads {threads}: latents equal {eq_lat}/{len(lat)} (max diff {maxd:.2e})"
              f", images equal {eq_img}/{len(img)}{'  differing in: ' + ','.join(bad) if bad else ''}"
              f"  ({time.time() - t1:.1f}s)", flush=True)
        summary[(mode, b, threads)] = (eq_lat, eq_img, len(lat))
    if mode != "current":
        ref_exact = ref
    else:
        ref_current = ref


def cross(a, b):
    if a in ALL and b in ALL:
        la, ia = ALL[a]; lb, ib = ALL[b]
        eq = sum(torch.equal(la[k], lb[k]) for k in la)
        eqi = sum(ia[k] == ib[k] for k in ia)
        print(f"cross: {a} vs {b}: latents equal {eq}/{len(la)}, images equal {eqi}/{len(ia)}")


cross(("rowwise", 1, 2), ("current", 1, 1))
cross(("rowwise", 1, 2), ("batched", 1, 2))
cross(("rowwise", 1, 2), ("current", 1, 2))
exact.restore(pipe)
print(f"total {time.time() - t0:.1f}s")
