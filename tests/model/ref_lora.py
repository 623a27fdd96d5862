"""Writers of random LoRA files for the LoRA parity tests, in the layouts users' files come in, and the
diffusers reference that applies them (load_lora_weights + fuse_lora).

Test-only (imports diffusers). The files are built by hand from the reference modules' names (SDXL's
sgm names from a map the caller passes; test_lora.py takes it from diffusers_layout.unet_key_map, which
the checkpoint parity tests prove), not by batchsd's LoRA mapping:

- `write_kohya_lora`: kohya/A1111 layout, `lora_unet_<path with "_">.lora_down.weight` / `.lora_up.weight`
  / `.alpha`. The UNet path is the diffusers module path (as kohya names SD 1.x files) or, with `sgm`,
  the original module path (as kohya names SDXL files; taken from a map of the reference's names to the
  original ones). Text encoders: `lora_te_` (SD 1.x/2.x) or `lora_te1_`/`lora_te2_` (SDXL) + transformers
  path. 3x3 convs get LoCon pairs (down [r, C, 3, 3], up [O, r, 1, 1]).
- `write_peft_lora`: diffusers/PEFT layout, `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`,
  `text_encoder.` / `text_encoder_2.`, lora_alpha in the `lora_adapter_metadata` safetensors metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# the diffusers UNet modules a LoRA adapts (what kohya's LoRA + LoCon and diffusers' trainers target):
# attention projections, feed-forward, transformer proj_in/proj_out, res-block convs, time projections,
# shortcuts, down/up-sampler convs
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                "conv1", "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(module: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(suffixes)}


def _pair(module: torch.nn.Module, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (down, up) for `module`, scaled so that the LoRA changes outputs by ~10%."""
    w = module.weight
    if w.ndim == 2:
        down = torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5
        up = torch.randn(w.shape[0], rank, generator=gen) * 0.3 / rank ** 0.5
    else:
        down = torch.randn(rank, *w.shape[1:], generator=gen) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], rank, 1, 1, generator=gen) * 0.3 / rank ** 0.5
    return down, up


def _text_path(name: str) -> str:
    """transformers module path below the model, with its `text_model.` level (transformers 5 drops it)."""
    return name if name.startswith("text_model.") else "text_model." + name


def write_kohya_lora(path: str | Path, unet, text_encoders: dict, *, rank: int = 4, alpha: float = 2.0,
                     seed: int = 0, sgm_names: dict[str, str] | None = None, conv: bool = True) -> Path:
    """`text_encoders`: {"te": model} or {"te1": model, "te2": model}. `sgm_names`: diffusers module path ->
    original module path (SDXL files name the UNet that way). `conv`: LoCon pairs on 3x3 convs too."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name: str, module: torch.nn.Module):
        if not conv and module.weight.ndim == 4 and module.weight.shape[-1] != 1:
            return
        down, up = _pair(module, rank, gen)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)

    for name, module in _targets(unet, UNET_TARGETS).items():
        add("lora_unet_" + (sgm_names[name] if sgm_names else name).replace(".", "_"), module)
    for prefix, model in text_encoders.items():
        for name, module in _targets(model, TEXT_TARGETS).items():
            add(f"lora_{prefix}_" + _text_path(name).replace(".", "_"), module)
    save_file(sd, str(path))
    return Path(path)


def write_peft_lora(path: str | Path, unet, text_encoders: dict, *, rank: int = 4, alpha: float = 8.0,
                    seed: int = 0) -> Path:
    """`text_encoders`: {"text_encoder": model[, "text_encoder_2": model]}."""
    gen = torch.Generator().manual_seed(seed)
    sd, metadata = {}, {}
    for component, model, suffixes in [("unet", unet, UNET_TARGETS)] + [
            (c, m, TEXT_TARGETS) for c, m in text_encoders.items()]:
        for name, module in _targets(model, suffixes).items():
            name = _text_path(name) if component != "unet" else name
            sd[f"{component}.{name}.lora_A.weight"], sd[f"{component}.{name}.lora_B.weight"] = _pair(module, rank, gen)
        # as diffusers writes it: the adapter's LoraConfig, each field under "<component>."
        metadata.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                         f"{component}.target_modules": list(suffixes)})
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    return Path(path)


def fuse_into(pipe, adapters: list[tuple[Path, float]]) -> None:
    """diffusers' way, one file at a time: load_lora_weights, fuse_lora(lora_scale=multiplier), unload."""
    for i, (file, multiplier) in enumerate(adapters):
        pipe.load_lora_weights(str(file), adapter_name=f"a{i}")
        pipe.fuse_lora(lora_scale=multiplier, adapter_names=[f"a{i}"])
        pipe.unload_lora_weights()
