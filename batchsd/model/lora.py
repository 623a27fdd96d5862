"""LoRA adapters on a model: each layer of a LoRA file (lora_files.read_lora) mapped to a module of OUR
model, then applied as a side path or merged, and removed exactly.

Names. kohya's and diffusers' module names are mapped to our original single-file attribute paths by the
project's diffusers rename (diffusers_layout.unet_key_map, openclip_text_encoder_key_map); OpenCLIP's
fused attn.in_proj_weight takes a q/k/v LoRA as its row block 0/1/2. Text-encoder layers after those the
model runs (SD 2.x and SDXL are built without their encoders' last layer, which files of the full
encoders adapt too) have no effect and are skipped. A LoRA for another family, or a name or shape that
fits no module, is a LoraError naming the file and its first keys.

Applying. Base weights are never written: each adapted layer gets a runtime side path, installed by
forward hooks and removed by their handles (`apply_loras` -> `AppliedLoras.remove()`, or the
`loras_applied` context manager), so removal restores the model exactly and no copy of the model is
made. Three kinds of side path, by how the model uses the layer:

    output delta     a Linear/Conv2d called as a module (plain, PackedConv2d, WinogradConv2d: the hook
                     sees their output whatever kernel made it): out += s * up(down(x))
    upsample delta   the 3x3 conv of a NearestUpsampleConv, which forward folds and never calls: a hook on
                     the upsample adds s * up(down(nearest(x))) to its output
    weight delta     a weight its owner reads as a tensor (the spatial transformer's proj_in/proj_out,
                     OpenCLIP's fused attn.in_proj_weight, whose row blocks 0/1/2 are q/k/v): for the
                     owner's call only, the parameter is swapped for W + s * up @ down (a temporary the size
                     of that one weight) and put back after it, exceptions included

Or merged (`apply_loras(..., merge=True)`): each adapted weight is swapped for a merged copy W + delta and
W is kept aside, untouched, until removal puts it back: no per-step cost, but memory for the merged copies
of the adapted weights. Either way removal is exact (tests/model/test_lora.py compares state dicts bit for
bit). Pipeline code that caches text encodings must drop them when the adapter set changes.

torch.compile: dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards), so
a UNet compiled before `apply_loras` can keep running without its side paths: apply (or remove) before
compiling, or compile again after (torch.compiler.reset()); not tested under compile.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from batchsd.model.diffusers_layout import FUSED_PART, openclip_text_encoder_key_map, unet_key_map
from batchsd.model.fast.packed_conv import PackedConv2d
from batchsd.model.fast.upsample import NearestUpsampleConv
from batchsd.model.lora_files import SHOWN_KEYS, LoraError, LoraFile, LoraLayer, read_lora
from batchsd.model.stable_diffusion import StableDiffusion2Model, StableDiffusionXLModel
from batchsd.model.unet import SpatialTransformer


# ----------------------------------------------------------------------------- names -> our modules

@dataclass(frozen=True)
class Target:
    """Where a LoRA layer goes in our model."""
    module: str               # the adapted module's path ("" for a fused parameter: see param)
    param: str = "weight"     # the owner's parameter ("in_proj_weight" for OpenCLIP's fused q/k/v)
    block: int | None = None  # row block of a fused parameter (0/1/2: q/k/v)
    owner: str = ""           # the module that owns `param` (= module, or the OpenCLIP attention)


_CLIP_LAYER_INNER = {f"{a}_{b}": f"{a}.{b}" for a, b in (
    ("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "out_proj"),
    ("mlp", "fc1"), ("mlp", "fc2"))}
_UNET_DIFFUSERS_BLOCK = (   # kohya's underscored diffusers block names -> dotted (the rest stays as is)
    (re.compile(r"^(down_blocks|up_blocks)_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_(.+)$"),
     r"\1.\2.\3.\4.\5"),
    (re.compile(r"^mid_block_(attentions|resnets)_(\d+)_(.+)$"), r"mid_block.\1.\2.\3"),
)


def _family_label(model: nn.Module) -> str:
    if isinstance(model, StableDiffusionXLModel):
        return "SDXL"
    return "SD 2.x" if isinstance(model, StableDiffusion2Model) else "SD 1.x"


def _text_encoders(model: nn.Module) -> dict[str, tuple[str, str]]:
    """component -> (attribute path of the text encoder in our model, "clip" | "openclip")."""
    if isinstance(model, StableDiffusionXLModel):
        first = ("conditioner.embedders.0.transformer.text_model", "clip")
        second = ("conditioner.embedders.1.model", "openclip")
        return {"te1": first, "text_encoder": first, "te2": second, "text_encoder_2": second}
    only = (("cond_stage_model.model", "openclip") if isinstance(model, StableDiffusion2Model)
            else ("cond_stage_model.transformer.text_model", "clip"))
    return {"te": only, "text_encoder": only}


def _unet_probes(model: nn.Module) -> list[str]:
    """Diffusers keys that pin what unet_key_map reads from a whole key set (res blocks per level, the up
    levels with attention), so that it maps a LoRA's few keys as it maps the model's."""
    cfg = model.unet.cfg
    levels = len(cfg.channel_mult)
    probes = [f"down_blocks.0.resnets.{cfg.res_blocks - 1}.conv1.weight"]
    probes += [f"up_blocks.{levels - 1 - level}.attentions.0.norm.weight"
               for level in range(levels) if cfg.depth_at(level)]
    return probes


class _Resolver:
    """Maps the file's (component, path) to a Target in one model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.encoders = _text_encoders(model)
        self.modules = dict(model.named_modules())
        unet = "model.diffusion_model"
        self.unet_by_underscored = {name.replace(".", "_"): f"{unet}.{name}"
                                    for name, m in model.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        assert len(self.unet_by_underscored) == sum(
            isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.unet.modules()), "underscored names collide"
        self.probes = _unet_probes(model)

    def unused(self, layer: LoraLayer) -> bool:
        """A text-encoder layer after those the model runs (SD 2.x and SDXL read their encoders' penultimate
        layer and are built without the last one; files of the full encoders adapt it too): no effect."""
        if layer.component not in self.encoders:
            return False
        m = re.match(r"(?:text_model[._])?encoder[._]layers[._](\d+)[._]", layer.path)
        root, _ = self.encoders[layer.component]
        return bool(m) and int(m[1]) >= self.model.get_submodule(root).cfg.layers

    def resolve(self, layer: LoraLayer) -> Target | None:
        if layer.component == "unet":
            return self._unet(layer.path)
        if layer.component in self.encoders:
            root, kind = self.encoders[layer.component]
            return self._text(layer.path, root, kind)
        return None

    def _unet(self, path: str) -> Target | None:
        underscored = path.replace(".", "_")
        if underscored in self.unet_by_underscored:                    # sgm names (SDXL kohya; dotted too)
            return Target(self.unet_by_underscored[underscored])
        dotted = path
        if "." not in path:                                           # kohya's underscored diffusers names
            for rx, repl in _UNET_DIFFUSERS_BLOCK:
                if rx.match(path):
                    dotted = rx.sub(repl, path)
                    break
        original = unet_key_map([dotted + ".weight", *self.probes])[dotted + ".weight"].removesuffix(".weight")
        module = self.unet_by_underscored.get(original.replace(".", "_"))
        return Target(module) if module else None

    def _text(self, path: str, root: str, kind: str) -> Target | None:
        path = path.removeprefix("text_model.").removeprefix("text_model_")
        if m := re.match(r"encoder_layers_(\d+)_(.+)$", path):         # kohya: underscored transformers names
            if m[2] not in _CLIP_LAYER_INNER:
                return None
            path = f"encoder.layers.{m[1]}.{_CLIP_LAYER_INNER[m[2]]}"
        if kind == "clip":
            return Target(f"{root}.{path}") if f"{root}.{path}" in self.modules else None
        original = openclip_text_encoder_key_map([path + ".weight"])[path + ".weight"]
        if FUSED_PART in original:                                     # q/k/v: a row block of in_proj_weight
            param_path, block = original.split(FUSED_PART)
            owner, param = param_path.rsplit(".", 1)
            return Target("", param, int(block), f"{root}.{owner}")
        module = f"{root}.{original.removesuffix('.weight')}"
        return Target(module) if module in self.modules else None


def guess_family(lora: LoraFile) -> str | None:
    """The family a LoRA was trained for ("SD 1.x", "SD 2.x", "SD 1.x/2.x", "SDXL" or None: unknown; no
    model needed, e.g. to check a manifest against a checkpoint's family before loading it), from its names
    and widths: SDXL by its second text encoder or its UNet's deeper transformers (SD 1.x/2.x have one
    block per transformer); SD 1.x/2.x by attention on the UNet's first level (SDXL has none there), told
    apart by the cross-attention context width of released models (768 / 1024)."""
    paths = [layer.path.replace(".", "_") for layer in lora.layers if layer.component == "unet"]
    if any(layer.component in ("te1", "te2", "text_encoder_2") for layer in lora.layers) or \
            any(re.search(r"transformer_blocks_[1-9]", p) for p in paths):
        return "SDXL"
    if any(re.match(r"(down_blocks_0_attentions|input_blocks_[12]_1)_", p) for p in paths):
        for layer in lora.layers:
            if layer.component == "unet" and layer.path.replace(".", "_").endswith("attn2_to_k"):
                width = layer.down.flatten(1).shape[1]
                return {768: "SD 1.x", 1024: "SD 2.x"}.get(width, "SD 1.x/2.x")
        return "SD 1.x/2.x"
    return None


# ----------------------------------------------------------------------------- shapes and deltas

@dataclass(frozen=True)
class _Term:
    """One LoRA's contribution to one target: up(down(x)) * scale."""
    down: torch.Tensor
    up: torch.Tensor
    scale: float


def _base_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight shape of a Linear/Conv2d (a PackedConv2d may hold its weight packed)."""
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)


def _param_like(module: nn.Module) -> torch.Tensor:
    for t in (getattr(module, "weight", None), getattr(module, "packed", None), getattr(module, "bias", None)):
        if isinstance(t, torch.Tensor):
            return t
    raise LoraError(f"{type(module).__name__} has no weight to take a dtype from")


def _fit(layer: LoraLayer, base: tuple[int, ...], like: torch.Tensor) -> _Term | str:
    """down/up reshaped for a base weight of shape `base` ([out, in] or [out, in, kh, kw]): a term (scale
    not yet multiplied) or why they do not fit."""
    down, up = layer.down, layer.up
    rank = down.shape[0]
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or up.shape[1] != rank or \
            (up.ndim == 4 and up.shape[2:] != (1, 1)):
        return f"down {tuple(down.shape)} / up {tuple(up.shape)} are not a rank-{rank} pair"
    up = up.flatten(1)                                                     # [out, r]
    if len(base) == 2 or base[2:] == (1, 1):                               # Linear or 1x1 conv: matrices
        if down.ndim == 4 and down.shape[2:] != (1, 1):
            return f"down {tuple(down.shape)} is a {down.shape[2]}x{down.shape[3]} conv; the layer is 1x1"
        down = down.flatten(1)                                             # [r, in]
        if (up.shape[0], down.shape[1]) != base[:2]:
            return f"down {tuple(layer.down.shape)} / up {tuple(layer.up.shape)} do not fit weight {base}"
        if len(base) == 4:
            down, up = down[:, :, None, None], up[:, :, None, None]
    else:
        if down.ndim != 4 or down.shape[1:] != base[1:] or up.shape[0] != base[0]:
            return f"down {tuple(layer.down.shape)} / up {tuple(layer.up.shape)} do not fit conv weight {base}"
        up = up[:, :, None, None]
    alpha = rank if layer.alpha is None else layer.alpha
    # the layer's (no copy per call); the CPU for a layer whose weights are freed (residency.py)
    to = dict(device=torch.device("cpu") if like.is_meta else like.device, dtype=like.dtype)
    return _Term(down.to(**to).contiguous(), up.to(**to).contiguous(), alpha / rank)


def _add_side(output: torch.Tensor, x: torch.Tensor, term: _Term, conv: nn.Conv2d | None) -> torch.Tensor:
    """output += s * up(down(x)), in place. Where output's memory is rows of channels (a Linear's
    contiguous [..., O], a conv's channels_last [B, O, H, W]), the up projection and the add are one
    addmm_ over those rows (one rounding of the sum, no temporary the size of the output)."""
    down, up = term.down.to(x.device, x.dtype), term.up.to(x.device, x.dtype)
    up2d = up.flatten(1)                                                  # [O, r]
    if conv is None:
        h = F.linear(x, down)                                             # [..., r]
        if output.is_contiguous() and output.dtype == h.dtype:
            output.view(-1, output.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up2d.t(), alpha=term.scale)
            return output
        return output.add_(F.linear(h, up2d), alpha=term.scale)
    h = F.conv2d(x, down, None, conv.stride, conv.padding, conv.dilation, conv.groups)   # [B, r, H, W]
    if output.is_contiguous(memory_format=torch.channels_last) and output.dtype == h.dtype and output.ndim == 4:
        rows = output.permute(0, 2, 3, 1).view(-1, output.shape[1])      # [B*H*W, O], output's memory
        rows.addmm_(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), up2d.t(), alpha=term.scale)
        return output
    return output.add_(F.conv2d(h, up), alpha=term.scale)


def _combined(terms: list[_Term]) -> list[_Term]:
    """Several files' terms on one layer as one term of their summed rank (downs stacked, each up times
    its scale): the same sum, in one down and one up projection per call."""
    if len(terms) < 2:
        return terms
    return [_Term(torch.cat([t.down for t in terms]), torch.cat([t.up * t.scale for t in terms], dim=1), 1.0)]


def _weight_delta(terms: list[_Term], shape: torch.Size) -> torch.Tensor:
    """sum of s * up @ down as a weight of `shape` (a kh x kw down with a 1x1 up is the kh x kw conv whose
    weight[o, c] = sum_r up[o, r] * down[r, c])."""
    total = None
    for t in terms:
        d = (t.up.flatten(1) @ t.down.flatten(1)).mul_(t.scale)
        total = d if total is None else total.add_(d)
    return total.view(shape)


# ----------------------------------------------------------------------------- apply / remove

class AppliedLoras:
    """One adapter set on one model; `remove()` takes it out: hooks removed, swapped weights put back."""

    def __init__(self, handles: list, restores: list[tuple[nn.Module, str, nn.Parameter]], names: list[str]):
        self._handles = handles
        self._restores = restores       # (module, parameter name, the original Parameter), merge mode
        self.names = names              # the files' stems, in order

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, name, original in reversed(self._restores):
            if isinstance(module, PackedConv2d):
                module.packed = None        # the merged weight's packed form; packed again at the next call
            module._parameters[name] = original
        self._handles, self._restores = [], []


def _output_hook(terms: list[_Term], conv: nn.Conv2d | None):
    """Forward hook of the adapted module: out += s * up(down(x))."""
    def hook(module, args, output):
        for t in terms:
            output = _add_side(output, args[0], t, conv)
        return output
    return hook


def _upsample_hook(terms: list[_Term], conv: nn.Conv2d):
    """Forward hook (with kwargs) of a NearestUpsampleConv(x, size): its conv sees x resized to `size`
    (default 2x), so the side path does too."""
    def hook(module, args, kwargs, output):
        size = args[1] if len(args) > 1 else kwargs.get("size")
        x = F.interpolate(args[0], size=size, scale_factor=None if size else 2.0, mode="nearest")
        for t in terms:
            output = _add_side(output, x, t, conv)
        return output
    return hook


def _swap_hooks(owner: nn.Module, holder: nn.Module, param: str,
                deltas: list[tuple[torch.Tensor, slice]]) -> list:
    """Hooks on `owner` that, for each of its calls, set holder.<param> to W + deltas (each added to its
    row slice) and put W itself back after the call, exceptions included. Returns their handles."""
    saved: list[nn.Parameter] = []          # a stack: a re-entrant call swaps and restores in turn

    def pre(module, args):
        base = holder._parameters[param]
        merged = base.detach().clone()
        for delta, rows in deltas:
            merged[rows] += delta.to(merged.device, merged.dtype)
        saved.append(base)
        holder._parameters[param] = nn.Parameter(merged, requires_grad=False)

    def post(module, args, output):
        if saved:
            holder._parameters[param] = saved.pop()
        return output

    return [owner.register_forward_pre_hook(pre), owner.register_forward_hook(post, always_call=True)]


def _merge(plan: dict, modules: dict[str, nn.Module]) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Merge mode (apply_loras): swap each adapted weight for W + delta; returns what to put back."""
    restores: list[tuple[nn.Module, str, nn.Parameter]] = []
    with torch.no_grad():
        for (path, param, block), (target, terms) in plan.items():
            holder = modules[target.owner or target.module]
            if isinstance(holder, PackedConv2d):
                holder.unpack()                            # its plain weight, bit for bit
            original = holder._parameters[param]
            acc = torch.promote_types(original.dtype, torch.float32)
            rows = slice(None) if block is None else slice(block * (original.shape[0] // 3),
                                                           (block + 1) * (original.shape[0] // 3))
            merged = original.detach().to(acc, copy=True)
            merged[rows] += _weight_delta([_Term(t.down.to(acc), t.up.to(acc), t.scale) for t in terms],
                                          merged[rows].shape)
            restores.append((holder, param, original))
            holder._parameters[param] = nn.Parameter(merged.to(original.dtype), requires_grad=False)
    return restores


def apply_loras(model: nn.Module, adapters: Sequence[tuple[LoraFile | str | Path, float]],
                merge: bool = False) -> AppliedLoras:
    """Install an adapter set [(file or parsed LoraFile, multiplier), ...] on `model` (a
    StableDiffusion(2|XL)Model). Every layer of every file is checked first (LoraError naming the file,
    the first keys and, for a LoRA of another family, both families); nothing is installed unless all fit.

    merge=False: side paths (module docstring); no weight is copied. merge=True: each adapted weight W is
    replaced, until `remove()`, by a new Parameter W + sum(s * up @ down) (summed in fp32 at least, cast to
    W's dtype), as diffusers' fuse_lora computes it; W itself is kept aside untouched and put back, so
    removal is exact too. Steps then cost what they cost without a LoRA; the price is memory for the
    merged copies of the adapted weights (a PackedConv2d's plain weight is kept beside its packed merged
    one). Sets applied together are removed in the reverse order (nested `loras_applied` blocks do that)."""
    files = [(f if isinstance(f, LoraFile) else read_lora(f), float(m)) for f, m in adapters]
    resolver = _Resolver(model)
    family = _family_label(model)
    # target key -> (Target, [terms]); several files on one layer add up
    plan: dict[tuple, tuple[Target, list[_Term]]] = {}
    for lora, multiplier in files:
        missing, misfit = [], []
        for layer in lora.layers:
            if resolver.unused(layer):
                continue
            target = resolver.resolve(layer)
            if target is None:
                missing.append(layer.key)
                continue
            if target.block is None:
                module = resolver.modules[target.module]
                base, like = _base_shape(module), _param_like(module)
            else:
                weight = getattr(resolver.modules[target.owner], target.param)
                rows = weight.shape[0] // 3
                base, like = (rows, *weight.shape[1:]), weight
            term = _fit(layer, base, like)
            if isinstance(term, str):
                misfit.append(f"{layer.key}: {term}")
                continue
            term = _Term(term.down, term.up, term.scale * multiplier)
            key = (target.owner or target.module, target.param, target.block)
            plan.setdefault(key, (target, []))[1].append(term)
        if missing or misfit:
            guess = guess_family(lora)
            if guess and family not in guess:
                raise LoraError(f"LoRA {lora.path}: this LoRA is for {guess}; the model is {family}: use a "
                                f"{family} LoRA or another model")
            detail = (f"{len(missing)} of its {len(lora.layers)} layers match no module of the {family} model "
                      f"(first: {', '.join(missing[:SHOWN_KEYS])})" if missing else
                      f"{len(misfit)} layers do not fit the {family} model's shapes (first: "
                      f"{'; '.join(misfit[:SHOWN_KEYS])})")
            raise LoraError(f"LoRA {lora.path}: {detail}: is it a LoRA for this model?")
    if merge:
        return AppliedLoras([], _merge(plan, resolver.modules), [lora.name for lora, _ in files])
    handles: list = []
    swaps: dict[str, list[tuple[str, torch.Tensor, slice]]] = {}      # owner path -> (param, delta, rows)
    try:
        for (path, param, block), (target, terms) in plan.items():
            if block is not None:
                weight = getattr(resolver.modules[target.owner], param)
                rows = weight.shape[0] // 3
                delta = _weight_delta(terms, torch.Size((rows, *weight.shape[1:])))
                swaps.setdefault(target.owner, []).append((param, delta, slice(block * rows, (block + 1) * rows)))
                continue
            module = resolver.modules[target.module]
            terms = _combined(terms)
            parent_path, _, name = target.module.rpartition(".")
            parent = resolver.modules[parent_path]
            conv = module if isinstance(module, nn.Conv2d) else None
            if isinstance(parent, SpatialTransformer) and name in ("proj_in", "proj_out"):   # read as tensors
                delta = _weight_delta(terms, torch.Size(_base_shape(module)))
                swaps.setdefault(parent_path, []).append((f"{name}.weight", delta, slice(None)))
            elif isinstance(parent, NearestUpsampleConv) and name == "conv":
                handles.append(parent.register_forward_hook(_upsample_hook(terms, conv), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_output_hook(terms, conv)))
        for owner_path, entries in swaps.items():
            owner = resolver.modules[owner_path]
            by_param: dict[str, list[tuple[torch.Tensor, slice]]] = {}
            for param, delta, rows in entries:
                by_param.setdefault(param, []).append((delta, rows))
            for param, deltas in by_param.items():
                holder_path, _, leaf = param.rpartition(".")
                holder = owner.get_submodule(holder_path) if holder_path else owner
                handles += _swap_hooks(owner, holder, leaf, deltas)
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return AppliedLoras(handles, [], [lora.name for lora, _ in files])


@contextmanager
def loras_applied(model: nn.Module, adapters: Sequence[tuple[LoraFile | str | Path, float]],
                  merge: bool = False) -> Iterator[AppliedLoras]:
    """`apply_loras` for the `with` block; removed at its end, exceptions included."""
    applied = apply_loras(model, adapters, merge)
    try:
        yield applied
    finally:
        applied.remove()
