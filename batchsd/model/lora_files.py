"""LoRA files: the kohya/A1111 and diffusers/PEFT layouts, read into one form (`read_lora` -> LoraFile).

Files. One LoRA file holds, per adapted layer, a down matrix [r, in] (or a conv kernel [r, C, kh, kw]), an
up matrix [out, r] (or [out, r, 1, 1]) and optionally an alpha; the layer's output becomes
`base(x) + multiplier * alpha / r * up(down(x))` (alpha missing: alpha = r). Names, per layout:

    kohya / A1111   lora_unet_<module path, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha
                    (SD 1.x/2.x: diffusers module paths, `lora_unet_down_blocks_0_attentions_0_...`;
                    SDXL: sgm paths, `lora_unet_input_blocks_4_1_...`; both are read for every family),
                    lora_te_text_model_encoder_layers_0_self_attn_q_proj... (SD 1.x/2.x text encoder,
                    transformers names), lora_te1_ / lora_te2_ (SDXL's CLIP ViT-L / OpenCLIP ViT-bigG);
                    LoCon conv layers: down [r, C, kh, kw] with the layer's kernel, up [out, r, 1, 1]
    diffusers/PEFT  unet.<diffusers module path>.lora_A.weight / .lora_B.weight, text_encoder.*,
                    text_encoder_2.*; older: .lora.down/.lora.up, .lora_linear_layer.down/.up,
                    attn processors' .processor.to_q_lora.down; alphas as `<module>.alpha` keys or in
                    the safetensors metadata `lora_adapter_metadata` (`unet.lora_alpha`, `unet.r`, ...)

Other adapter kinds (LyCORIS LoHa/LoKr, DoRA, full-weight diffs) are refused by name. Where each layer
goes in a model is lora.py's business.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from batchsd.errors import InputError
from batchsd.model.safe_pickle import PickleRefused, PickleUnreadable, load_pickle


class LoraError(InputError):
    """A LoRA file that cannot be read or does not fit the model."""


# (down suffix, up suffix) of each layout's pair of matrices
_PAIRS = (
    (".lora_down.weight", ".lora_up.weight"),                   # kohya / A1111
    (".lora_A.weight", ".lora_B.weight"),                       # PEFT (diffusers >= 0.24)
    (".lora.down.weight", ".lora.up.weight"),                   # diffusers LoRACompatibleLinear/Conv
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),  # diffusers text encoder, old
)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")  # attn processors
_UNSUPPORTED = {  # marker in a key -> what the file is
    "hada_": "a LyCORIS LoHa", "lokr_": "a LyCORIS LoKr", ".dora_scale": "a DoRA",
    ".lora_mid.": "a LyCORIS LoCon with a mid (Tucker) kernel", ".lora_magnitude_vector": "a DoRA",
}
_FULL_DIFF_SUFFIXES = (".diff", ".diff_b")   # LyCORIS full-weight diffs (a key's end: model.diffusion_model. is not one)
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
SHOWN_KEYS = 5   # keys named in a message


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer of a file: where (component and the file's own path), the matrices, alpha."""
    # "unet" | "te" (kohya: SD 1.x/2.x text encoder) | "te1" | "te2" (kohya: SDXL's) | "text_encoder" |
    # "text_encoder_2" (diffusers: the first / SDXL's second)
    component: str
    path: str                 # the file's module path: dotted or kohya-underscored, diffusers or sgm names
    key: str                  # the file's down key (messages)
    down: torch.Tensor        # [r, in] or [r, C, kh, kw]
    up: torch.Tensor          # [out, r] or [out, r, 1, 1]
    alpha: float | None       # None: alpha = r


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA file: its layers, in file order."""
    path: Path
    layers: tuple[LoraLayer, ...]

    @property
    def name(self) -> str:
        return self.path.stem


def _alpha_value(path: Path, key: str, alpha: torch.Tensor) -> float:
    """A layer's `.alpha`: one finite number (LoraError otherwise)."""
    if not isinstance(alpha, torch.Tensor) or alpha.numel() != 1 or not torch.isfinite(alpha.float()).all():
        shown = list(alpha.shape) if isinstance(alpha, torch.Tensor) and alpha.numel() != 1 else alpha
        raise LoraError(f"LoRA file {path}: {key} is {shown}, not one finite number (a layer's alpha, its scale "
                        "numerator); the file is damaged or not a LoRA")
    return float(alpha)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A .safetensors (tensors, metadata) or a .pt/.ckpt/.bin (read with weights_only)."""
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist: put it in the LoRA folder or fix its name")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        data = load_pickle(path)
    except PickleRefused as e:
        raise LoraError(f"LoRA file {path} is refused: its pickle needs more than tensors (it references "
                        f"{e.global_name}); batchsd never runs code from a file: use a .safetensors version") from None
    except PickleUnreadable as e:
        raise LoraError(f"LoRA file {path} cannot be read ({e.what}): is it a LoRA file?") from None
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file, named
        raise LoraError(f"LoRA file {path} cannot be read ({type(e).__name__}: {e}): is it a LoRA file?") from e
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraError(f"LoRA file {path} is not a flat dict of tensors")
    return data, {}


def _split_name(module: str) -> tuple[str, str]:
    """A file's module name -> (component, path within it)."""
    for prefix, component in (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"),
                              ("lora_te_", "te"), ("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"),
                              ("text_encoder.", "text_encoder")):
        if module.startswith(prefix):
            return component, module[len(prefix):]
    return "", module


def _metadata_alpha(metadata: dict[str, str], component: str, path: str) -> float | None:
    """alpha from diffusers' `lora_adapter_metadata` (a PEFT LoraConfig per component prefix)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    prefix = {"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}.get(component, component)
    get = lambda k: config.get(f"{prefix}.{k}")   # noqa: E731
    if get("use_rslora") or get("use_dora"):
        raise LoraError("rsLoRA/DoRA adapters are not supported")
    for pattern, alpha in (get("alpha_pattern") or {}).items():   # PEFT's rule: a suffix of the module path
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(alpha)
    return None if get("lora_alpha") is None else float(get("lora_alpha"))


def read_lora(path: str | Path) -> LoraFile:
    """Parse a LoRA file (either layout; module docstring). LoraError for unreadable files, other
    adapter types (LoHa, LoKr, DoRA, ...), and down/up keys without their pair."""
    path = Path(path)
    tensors, metadata = _read_tensors(path)
    if sum(k.startswith(_CHECKPOINT_PREFIXES) for k in tensors) > len(tensors) // 2:
        raise LoraError(f"LoRA file {path} is a full model checkpoint, not a LoRA: give it as --model (or in the "
                        "model column), and keep only LoRA files in the LoRA folder")
    for marker, kind in _UNSUPPORTED.items():
        if bad := [k for k in tensors if marker in k]:
            raise LoraError(f"LoRA file {path} is {kind} ({bad[0]}): only plain LoRA/LoCon (down/up pairs) is supported")
    if bad := [k for k in tensors if k.endswith(_FULL_DIFF_SUFFIXES)]:
        raise LoraError(f"LoRA file {path} is a full-weight diff ({bad[0]}): only plain LoRA/LoCon (down/up pairs) "
                        "is supported")
    renamed = {}
    for key, value in tensors.items():
        if m := _PROCESSOR.search(key):
            module = key[:m.start()] + "." + (m[1] if m[1] != "to_out" else "to_out.0")
            key = f"{module}.lora.{m[2]}.weight"
        renamed[key] = value
    layers, used, unpaired = [], set(), []
    for key in renamed:
        for down_suffix, up_suffix in _PAIRS:
            if key.endswith(down_suffix):
                module = key[:-len(down_suffix)]
                up_key = module + up_suffix
                if up_key not in renamed:
                    unpaired.append(key)
                    break
                component, inner = _split_name(module)
                alpha = renamed.get(module + ".alpha")
                alpha = _alpha_value(path, module + ".alpha", alpha) if alpha is not None else (
                    _metadata_alpha(metadata, component, inner) if component else None)
                layers.append(LoraLayer(component, inner, key, renamed[key], renamed[up_key], alpha))
                used.update((key, up_key, module + ".alpha"))
                break
    unknown = [k for k in renamed if k not in used]
    if unpaired or unknown or not layers:
        shown = (unpaired or unknown)[:SHOWN_KEYS]
        what = "down weights without their up weights" if unpaired else "keys that are not LoRA down/up/alpha"
        raise LoraError(f"LoRA file {path}: {len(unpaired or unknown) or 'no'} {what}"
                        + (f" (first: {', '.join(shown)})" if shown else " and no LoRA layers"))
    return LoraFile(path, tuple(layers))


def lora_header_sha256(path: str | Path) -> str | None:
    """sha256 of a .safetensors file's JSON header (None for other files, whose lora_hash covers the
    whole file). The header holds what lora_hash leaves out and a PEFT file's alpha lives in
    (`lora_adapter_metadata`), so a resume key needs both. Cached per file version."""
    if Path(path).suffix != ".safetensors":
        return None
    try:
        stat = os.stat(path)
        return _header_sha256(str(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return None          # gone since the row was read: loading it says so


@functools.lru_cache(maxsize=256)
def _header_sha256(path: str, mtime_ns: int, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(int.from_bytes(f.read(8), "little"))).hexdigest()


def lora_hash(path: str | Path) -> str:
    """The sha256 A1111 shows for a LoRA ("Lora hashes: name: <first 12>"): for a .safetensors file, of
    its tensor data only (kohya/addnet's hash: the JSON header, metadata included, is left out), for
    other files, of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
