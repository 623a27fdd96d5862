"""Prototype of an "exact mode" for batchsd on the CPU, without editing the repository.

`enable_exact(pipe, strategy)` changes one Pipeline instance (and, process-wide, a few torch.nn.functional
entry points) so that a row's bits depend on the row only, not on the batch it runs in nor on the
intra-op thread count:

  thread pins (process-wide patches, CPU tensors only): the ops whose result depends on how ATen
  splits the work between threads run on 1 thread
    - F.group_norm on channels_last input with H*W >= 1024 (ATen's "impl-2": partial sums per thread
      over N*H*W, combined at the end)  [gn="pin"]; or, gn="nchw": run it on an NCHW copy (parallel
      over N*G, one (n, g) per thread: thread- and batch-invariant) and return channels_last
    - F.silu, F.gelu, torch.sigmoid (fp32: vectorised body vs scalar tail of each thread's chunk: a
      thread count that does not split numel into multiples of 32 moves elements to the scalar path)
    - oneDNN convolutions (PackedConv2d) whose output work B*OH*OW*C_out per thread is small (fp32
      brgemm conv blocking depends on the thread count there)
    - F.scaled_dot_product_attention with one query token (the 1x1 middle block of 64x64 images; fp32
      MKL gemv-like path splits by threads)
  text: every prompt encoded alone (batch 1), so the cache content is independent of which prompts met
  strategy "rowwise": each row's UNet call has a fixed shape: [uncond_i, cond_i] (batch 2) for
      cfg != 1, [cond_i] (batch 1) for cfg == 1; the CFG combination per row with the same arithmetic
  strategy "batched": the batched forward kept; the batch-dependent ops made shape-stable instead:
      F.linear / torch.bmm with fewer than 12 rows (fp32) / 2 rows (bf16) padded with zero rows (fp32 MKL:
      M=1, M=2..3 and the M % 4 tail rows of calls with M < 12 take other kernels; bf16 oneDNN: M=1 differs), F.gelu on a contiguous copy (the GEGLU gate
      view is contiguous at batch 1 and strided otherwise), 1-query SDPA run per batch row
  VAE: already one image per call on the CPU; only the thread pins apply

`disable_exact()` restores the patched functions.
"""
from __future__ import annotations

import contextlib
import torch
import torch.nn.functional as F

_ORIG = {}
PIN_STATS = {"pins": 0}
GN_MODE = {"mode": "pin"}
GN_MIN_HW = 1024          # ATen GroupNorm channels_last switches to the per-thread-partial-sum impl at H*W >= 1024


@contextlib.contextmanager
def one_thread():
    t = torch.get_num_threads()
    if t == 1:
        yield
        return
    torch.set_num_threads(1)
    PIN_STATS["pins"] += 1
    try:
        yield
    finally:
        torch.set_num_threads(t)


def _is_cpu(x):
    return isinstance(x, torch.Tensor) and x.device.type == "cpu"


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    g = _ORIG["group_norm"]
    if not _is_cpu(input) or input.dim() < 3:
        return g(input, num_groups, weight, bias, eps)
    hw = input[0, 0].numel()
    cl = input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    if not cl or hw < GN_MIN_HW:
        return g(input, num_groups, weight, bias, eps)          # per-(n, g) path: batch- and thread-invariant
    if GN_MODE["mode"] == "nchw":
        return g(input.contiguous(), num_groups, weight, bias, eps).contiguous(memory_format=torch.channels_last)
    with one_thread():
        return g(input, num_groups, weight, bias, eps)


def _pinned(name):
    f = _ORIG[name]

    def wrapper(input, *args, **kwargs):
        if not _is_cpu(input):
            return f(input, *args, **kwargs)
        with one_thread():
            return f(input, *args, **kwargs)
    wrapper.__name__ = name
    return wrapper


def _gelu_batched(input, *args, **kwargs):
    if _is_cpu(input) and not input.is_contiguous():
        input = input.contiguous()
    with one_thread():
        return _ORIG["gelu"](input, *args, **kwargs)


def _sdpa(q, k, v, *args, **kwargs):
    f = _ORIG["scaled_dot_product_attention"]
    if not _is_cpu(q) or q.shape[-2] != 1:
        return f(q, k, v, *args, **kwargs)
    with one_thread():
        if STRATEGY["s"] == "batched" and q.shape[0] > 1:   # one batch row per call: the shape of batch 1
            return torch.cat([f(q[i:i + 1], k[i:i + 1], v[i:i + 1], *args, **kwargs) for i in range(q.shape[0])])
        return f(q, k, v, *args, **kwargs)


def _min_rows(dtype):
    return 12 if dtype == torch.float32 else 2   # fp32 MKL: rows in the M % 4 tail of calls with M < 12 use another kernel


def _linear(input, weight, bias=None):
    f = _ORIG["linear"]
    if _is_cpu(input) and input.dtype in (torch.float32, torch.bfloat16):
        m = input.numel() // max(input.shape[-1], 1)
        need = _min_rows(input.dtype)
        if 0 < m < need:
            flat = input.reshape(m, input.shape[-1])
            padded = torch.cat([flat, flat.new_zeros(need - m, flat.shape[1])])
            return f(padded, weight, bias)[:m].reshape(*input.shape[:-1], weight.shape[0])
    return f(input, weight, bias)


def _bmm(a, b, *args, **kwargs):
    f = _ORIG["bmm"]
    if _is_cpu(a) and a.dtype in (torch.float32, torch.bfloat16) and a.shape[1] < _min_rows(a.dtype):
        m = a.shape[1]
        a2 = torch.cat([a, a.new_zeros(a.shape[0], _min_rows(a.dtype) - m, a.shape[2])], dim=1)
        return f(a2, b, *args, **kwargs)[:, :m]
    return f(a, b, *args, **kwargs)


STRATEGY = {"s": None}
CONV_PIN_WORK = 16384     # pin a oneDNN conv to 1 thread when B*OH*OW*C_out / threads is below this


def _packed_forward(self, x):
    """PackedConv2d.forward, on 1 thread when its output is small for the thread count: oneDNN's fp32
    brgemm convolution picks a thread-count-dependent blocking (other summation order) for small outputs
    (observed: B*OH*OW*C_out / T <= 5120, e.g. [1,1280,2,2] at 3 threads, [1,640,8,8]->320 at 4)."""
    f = _ORIG["packed_forward"]
    if x.device.type != "cpu" or x.dim() != 4:
        return f(self, x)
    t = torch.get_num_threads()
    if t > 1:
        oh = (x.shape[2] + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (x.shape[3] + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        if x.shape[0] * oh * ow * self.out_channels < CONV_PIN_WORK * t:
            with one_thread():
                return f(self, x)
    return f(self, x)


def patch_functions(strategy: str, gn: str = "pin"):
    """Process-wide patches of the torch entry points the batchsd modules call at run time."""
    from batchsd.model.fast.packed_conv import PackedConv2d
    if not _ORIG:
        _ORIG.update(group_norm=F.group_norm, silu=F.silu, gelu=F.gelu, sigmoid=torch.sigmoid,
                     scaled_dot_product_attention=F.scaled_dot_product_attention, linear=F.linear, bmm=torch.bmm,
                     packed_forward=PackedConv2d.forward)
    PackedConv2d.forward = _packed_forward
    STRATEGY["s"] = strategy
    GN_MODE["mode"] = gn
    F.group_norm = _group_norm
    F.silu = _pinned("silu")
    torch.sigmoid = _pinned("sigmoid")
    F.scaled_dot_product_attention = _sdpa
    if strategy == "batched":
        F.gelu = _gelu_batched
        F.linear = _linear
        torch.bmm = _bmm
    else:
        F.gelu = _pinned("gelu")
        F.linear = _ORIG["linear"]
        torch.bmm = _ORIG["bmm"]


def disable_exact():
    if _ORIG:
        from batchsd.model.fast.packed_conv import PackedConv2d
        PackedConv2d.forward = _ORIG["packed_forward"]
        F.group_norm, F.silu, F.gelu = _ORIG["group_norm"], _ORIG["silu"], _ORIG["gelu"]
        torch.sigmoid, torch.bmm = _ORIG["sigmoid"], _ORIG["bmm"]
        F.scaled_dot_product_attention, F.linear = _ORIG["scaled_dot_product_attention"], _ORIG["linear"]
    STRATEGY["s"] = None


def _encode_text_alone(pipe):
    """Pipeline._encode_text with every missing prompt encoded on its own (batch 1)."""
    def encode(prompts):
        missing = list(dict.fromkeys(p for p in prompts if p not in pipe._text_cache))
        for p in missing:
            states, truncated = pipe.family.encode_text(pipe.model, [p], pipe.device)
            pipe._text_cache[p] = (states[0], truncated[0])
        for p in prompts:
            pipe._text_cache.move_to_end(p)
        out = torch.stack([pipe._text_cache[p][0] for p in prompts])
        cut = [pipe._text_cache[p][1] for p in prompts]
        while len(pipe._text_cache) > 256:
            pipe._text_cache.popitem(last=False)
        return out, cut
    return encode


def _rowwise_eps_model(pipe):
    """Pipeline._guided_eps_model with one UNet forward per row, of a shape fixed by the row:
    [uncond_i, cond_i] for cfg != 1, [cond_i] for cfg == 1. Same CFG arithmetic as the batched path."""
    def make(cond, uncond, scales):
        unet, dtype, mf = pipe.unet, pipe.dtype, pipe.memory_format
        per_row_scale = [torch.tensor([s], dtype=torch.float32, device=pipe.device).view(-1, 1, 1, 1) for s in scales]

        def eps_model(x, t):
            outs = []
            for i, s in enumerate(scales):
                xi = x[i:i + 1]
                guided = s != 1.0
                x_in = torch.cat([xi, xi]) if guided else xi
                ctx = torch.cat([uncond[i:i + 1], cond[i:i + 1]]) if guided else cond[i:i + 1]
                ts = torch.full((x_in.shape[0],), float(t), dtype=torch.float32, device=x.device)
                out = unet(x_in.to(dtype).contiguous(memory_format=mf), ts, ctx).float()
                if guided:
                    e_u, e = out[:1], out[1:].clone()
                    e = e_u + per_row_scale[i] * (e - e_u)
                else:
                    e = out
                outs.append(e)
            return torch.cat(outs)
        return eps_model
    return make


def enable_exact(pipe, strategy: str = "rowwise", gn: str = "pin"):
    """strategy: rowwise | batched. gn: pin (1 thread) | nchw (NCHW copy) for the large channels_last GroupNorms."""
    assert strategy in ("rowwise", "batched")
    patch_functions(strategy, gn)
    pipe._text_cache.clear()
    pipe._encode_text = _encode_text_alone(pipe)
    if strategy == "rowwise":
        pipe._guided_eps_model = _rowwise_eps_model(pipe)
    else:
        pipe.__dict__.pop("_guided_eps_model", None)
    return pipe


def restore(pipe):
    disable_exact()
    pipe.__dict__.pop("_encode_text", None)
    pipe.__dict__.pop("_guided_eps_model", None)
    pipe._text_cache.clear()
