"""Do process-level settings remove the batch/thread dependence? Each setting in a fresh subprocess
(MKL_CBWR must be set before MKL loads). Probes: fp32 linear row 0 at M=1,2,3,4,8 (classes), GroupNorm
channels_last 32x32 batch/thread, SDPA N=1 batch/thread, and the time of a [4096,1280]x[1280,1280] sgemm."""
import json, os, subprocess, sys

PROBE = r'''
import json, time, torch, torch.nn.functional as F
setting = __SETTING__
if setting.get("det"): torch.use_deterministic_algorithms(True)
if setting.get("mkldnn_det"): torch.backends.mkldnn.deterministic = True
if setting.get("mkldnn_off"): torch.backends.mkldnn.enabled = False
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
res = {}
w = torch.randn(1280, 1280, generator=g) / 36; b = torch.randn(1280, generator=g); x = torch.randn(8, 1280, generator=g)
outs = [F.linear(x[:m], w, b)[0] for m in (1, 2, 3, 4, 8)]
cls = []
for o in outs:
    cls.append(next((i for i, c in enumerate(outs) if torch.equal(c, o)), None))
res["linear classes M=1,2,3,4,8"] = cls
torch.set_num_threads(1); o1 = F.linear(x[:1], w, b); torch.set_num_threads(2)
res["linear thr1v2 M=1"] = torch.equal(o1, outs[0][None])
gn = torch.nn.GroupNorm(32, 320)
xs = torch.randn(4, 320, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    r1 = gn(xs[:1]); r4 = gn(xs)[:1]
    torch.set_num_threads(1); t1 = gn(xs[:1]); torch.set_num_threads(2)
res["gn_cl batch-invariant"] = torch.equal(r1, r4); res["gn_cl thread-invariant"] = torch.equal(r1, t1)
q = torch.randn(4, 8, 1, 160, generator=g); k = torch.randn(4, 8, 77, 160, generator=g); v = torch.randn(4, 8, 77, 160, generator=g)
s1 = F.scaled_dot_product_attention(q[:1], k[:1], v[:1]); s4 = F.scaled_dot_product_attention(q, k, v)[:1]
torch.set_num_threads(1); st = F.scaled_dot_product_attention(q[:1], k[:1], v[:1]); torch.set_num_threads(2)
res["sdpa N=1 batch-invariant"] = torch.equal(s1, s4); res["sdpa N=1 thread-invariant"] = torch.equal(s1, st)
a = torch.randn(4096, 1280, generator=g)
F.linear(a, w); t0 = time.perf_counter()
for _ in range(5): F.linear(a, w)
res["sgemm 4096x1280x1280 ms"] = round((time.perf_counter() - t0) / 5 * 1000, 1)
print(json.dumps(res))
'''

SETTINGS = [
    ("default", {}, {}),
    ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}, {}),
    ("MKL_CBWR=AVX2", {"MKL_CBWR": "AVX2"}, {}),
    ("MKL_CBWR=AVX512", {"MKL_CBWR": "AVX512"}, {}),
    ("MKL_CBWR=AVX2,STRICT", {"MKL_CBWR": "AVX2,STRICT"}, {}),
    ("MKL_CBWR=AVX512,STRICT", {"MKL_CBWR": "AVX512,STRICT"}, {}),
    ("MKL_CBWR=AUTO,STRICT", {"MKL_CBWR": "AUTO,STRICT"}, {}),
    ("use_deterministic_algorithms(True)", {}, {"det": 1}),
    ("torch.backends.mkldnn.deterministic=True", {}, {"mkldnn_det": 1}),
    ("torch.backends.mkldnn.enabled=False", {}, {"mkldnn_off": 1}),
    ("MKL_DYNAMIC=FALSE", {"MKL_DYNAMIC": "FALSE"}, {}),
    ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, {}),
    ("ONEDNN_MAX_CPU_ISA=AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, {}),
]
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from common import cpu_kind
print(cpu_kind())
for name, env, setting in SETTINGS:
    code = PROBE.replace("__SETTING__", repr(setting))
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    print(f"{name:42s}", r.stdout.strip() or r.stderr.strip()[-300:], flush=True)
