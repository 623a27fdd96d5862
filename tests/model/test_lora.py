"""LoRA (batchsd/model/lora.py) against diffusers' load_lora_weights + fuse_lora on random tiny models, with
random LoRA files in the kohya/A1111 layout (LoCon 3x3 convs included) and the diffusers/PEFT layout.

Tolerances (the parity tests'): module outputs within 1e-4; images within 1/255 on 99.9% of pixels and
final latents within 2e-3 relative. Every comparison also checks that the LoRA moved the output by far
more than the tolerance (so a LoRA silently not applied fails). Removal restores the state dict bit for
bit and leaves no hook.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")   # diffusers' load_lora_weights needs its PEFT backend
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

from batchsd import GenerationRow, Pipeline  # noqa: E402
from batchsd.model.config import TINY  # noqa: E402
from batchsd.model.diffusers_layout import diffusers_to_original, unet_key_map  # noqa: E402
from batchsd.model.family import sdxl_vector  # noqa: E402
from batchsd.model.fast.winograd import use_winograd  # noqa: E402
from batchsd.model.lora import LoraError, apply_loras, loras_applied, read_lora  # noqa: E402
from batchsd.model.lora_files import lora_hash  # noqa: E402
from batchsd.model.tokenizer import load_tokenizer  # noqa: E402

from ref_checkpoint import write_original_checkpoint  # noqa: E402
from ref_clip import build_reference_clip  # noqa: E402
from ref_lora import fuse_into, write_kohya_lora, write_peft_lora  # noqa: E402
from ref_sd2 import SD2_TEST, build_reference_sd2, write_sd2_single_file  # noqa: E402
from ref_sdxl import SDXL_TEST, build_reference_sdxl, sdxl_run, write_sdxl_single_file  # noqa: E402
from ref_sdxl import reference_scheduler as sdxl_scheduler  # noqa: E402
from ref_unet import build_reference_unet  # noqa: E402
from ref_vae import build_reference_vae  # noqa: E402
from test_pipeline_parity import diffusers_run, reference_scheduler  # noqa: E402
from image_parity import FIGURES, assert_image_parity  # noqa: E402

MODULE_TOL = 1e-4
LATENT_REL_TOL = 2e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def sd1_reference() -> dict:
    """Fresh reference components (fuse_lora writes into them)."""
    return dict(text_encoder=build_reference_clip(TINY.clip, seed=11), vae=build_reference_vae(TINY.vae, seed=12),
                unet=build_reference_unet(TINY.unet, seed=13), tokenizer=load_tokenizer())


def unet_sgm_names(unet) -> dict[str, str]:
    """diffusers module path -> original module path (how kohya names SDXL's UNet)."""
    return {k.removesuffix(".weight"): v.removesuffix(".weight")
            for k, v in unet_key_map(unet.state_dict().keys()).items() if k.endswith(".weight")}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("lora_sd1")
    ref = sd1_reference()
    path = write_original_checkpoint(folder / "tiny.safetensors", diffusers_to_original("unet", ref["unet"].state_dict()),
                                     diffusers_to_original("vae", ref["vae"].state_dict()),
                                     diffusers_to_original("text_encoder", ref["text_encoder"].state_dict()),
                                     dtype=torch.float32)
    files = dict(
        kohya=write_kohya_lora(folder / "kohya.safetensors", ref["unet"], {"te": ref["text_encoder"]}, seed=1),
        peft=write_peft_lora(folder / "peft.safetensors", ref["unet"], {"text_encoder": ref["text_encoder"]}, seed=2),
        kohya_sgm=write_kohya_lora(folder / "kohya_sgm.safetensors", ref["unet"], {"te": ref["text_encoder"]}, seed=1,
                                   sgm_names=unet_sgm_names(ref["unet"])))
    return dict(ours=Pipeline.load(path, device="cpu", dtype="fp32"), files=files, path=path)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("lora_sdxl")
    ref = build_reference_sdxl(SDXL_TEST)
    path = write_sdxl_single_file(folder / "sdxl.safetensors", ref)
    encoders = {"te1": ref["text_encoder"], "te2": ref["text_encoder_2"]}
    files = dict(
        kohya=write_kohya_lora(folder / "kohya.safetensors", ref["unet"], encoders, seed=3,
                               sgm_names=unet_sgm_names(ref["unet"])),
        peft=write_peft_lora(folder / "peft.safetensors", ref["unet"], {"text_encoder": ref["text_encoder"],
                                                                         "text_encoder_2": ref["text_encoder_2"]}, seed=4))
    return dict(ours=Pipeline.load(path, device="cpu", dtype="fp32"), files=files)


def adapter_set(files: dict, which: str) -> list[tuple[Path, float]]:
    return {"kohya": [(files["kohya"], 0.8)], "peft": [(files["peft"], 0.7)],
            "both": [(files["kohya"], 0.8), (files["peft"], -0.5)]}[which]


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_restored(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before), "a weight changed"
    hooked = [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, f"hooks left on {hooked[:3]}"


def assert_module_close(name: str, ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> None:
    diff, moved = (ours - ref).abs().max().item(), (base - ref).abs().max().item()
    FIGURES.append(f"{name:40s} max |diff| {diff:.1e}  (the LoRA moved it by {moved:.2f})")
    assert diff <= MODULE_TOL, f"{name}: {diff:.2e}"
    assert moved > 100 * MODULE_TOL, f"{name}: the LoRA changed nothing ({moved:.1e})"


def generate(pipe: Pipeline, row: GenerationRow):
    """pipe.generate([row]) with the text encodings computed now: the Pipeline keeps encoded prompts in a
    cache whose key does not include the adapter set (changing the set must clear it; the Pipeline's job)."""
    getattr(pipe, "_text_cache", {}).clear()
    return pipe.generate([row])


def assert_images_close(name: str, out, image_ref: np.ndarray, latents_ref: torch.Tensor) -> None:
    assert_image_parity(name, out.images[0], out.latents, image_ref, latents_ref, LATENT_REL_TOL)


# ----------------------------------------------------------------------------- SD 1.x

ROW = GenerationRow("a red cube on a table", negative_prompt="blurry", seed=3, steps=4, cfg_scale=7.5,
                    sampler="euler", width=64, height=64)


@pytest.mark.parametrize("which,merge", [("kohya", False), ("peft", False), ("both", False), ("both", True)])
def test_sd1_images_match_diffusers_fused(sd1, which, merge):
    adapters = adapter_set(sd1["files"], which)
    ref = sd1_reference()
    parts = dict(scheduler=reference_scheduler("euler"), safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False, **ref)
    base_image, base_latents = diffusers_run(parts, ROW)
    fuse_into(StableDiffusionPipeline(**parts), adapters)
    image_ref, latents_ref = diffusers_run(parts, ROW)
    assert (latents_ref - base_latents).abs().max() > 0.1 * latents_ref.abs().max(), "the LoRA changed nothing"
    model = sd1["ours"].model
    before = state(model)
    with loras_applied(model, adapters, merge) as applied:
        assert applied.names == [f.stem for f, _ in adapters]
        out = generate(sd1["ours"], ROW)
    assert_images_close(f"SD 1.x image, {which}{', merged' * merge}", out, image_ref, latents_ref)
    assert_restored(model, before)
    again = generate(sd1["ours"], ROW)
    assert_images_close("SD 1.x image after removal", again, base_image, base_latents)


def test_sd1_kohya_sgm_names_are_the_same_lora(sd1):
    """A kohya file naming the UNet by its original (sgm/CompVis) paths adapts the same layers as one naming
    it by diffusers' paths: equal outputs (to rounding: the hooks are installed in another order)."""
    model, x, t, ctx = sd1["ours"].model, torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 77, 64)
    outs = []
    for name in ("kohya", "kohya_sgm"):
        with loras_applied(model, [(sd1["files"][name], 0.9)]):
            outs.append(model.unet(x, t, ctx))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    assert (outs[0] - model.unet(x, t, ctx)).abs().max() > 0.1


def test_sd1_side_paths_compose_with_winograd_and_packed_convs(sd1):
    """The Pipeline's CPU convolutions are PackedConv2d; with Winograd on every 3x3 conv too, the UNet with a
    LoCon LoRA still equals diffusers' fused UNet."""
    ours = Pipeline.load(sd1["path"], device="cpu", dtype="fp32")
    assert use_winograd(ours.model.unet, min_channels=1) > 0
    ref = sd1_reference()
    fuse_into(StableDiffusionPipeline(scheduler=reference_scheduler("euler"), safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False, **ref),
              [(sd1["files"]["kohya"], 1.0)])
    t, ctx = torch.tensor([700.0, 20.0]), torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(6))
    before = state(ours.model)
    for size, merge in (((16, 16), False), ((9, 11), False), ((16, 16), True), ((9, 11), True)):
        # 9x11: upsamples to odd sizes, not by 2 (the unfolded path)
        x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(5))
        base = ours.model.unet(x, t, ctx)
        with loras_applied(ours.model, [(sd1["files"]["kohya"], 1.0)], merge), torch.no_grad():
            got = ours.model.unet(x, t, ctx)
            want = ref["unet"](x, t, ctx).sample
        assert_module_close(f"SD 1.x UNet {size}, Winograd + packed{', merged' * merge}", got, want, base)
        assert torch.equal(ours.model.unet(x, t, ctx), base)
    assert_restored(ours.model, before)


def test_bf16_side_paths_and_merge_match_fp32_and_restore(sd1):
    """In bf16 the side paths run in the weights' dtype: side paths and merged weights land as near the fp32
    LoRA image as bf16 rounding puts the plain model from its fp32 image (x3), far from the image without
    the LoRA; removal restores the bf16 weights exactly."""
    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    pipe = Pipeline.load(sd1["path"], device="cpu", dtype="bf16")
    adapters = adapter_set(sd1["files"], "both")
    before = state(pipe.model)
    base, base32 = generate(pipe, ROW).latents, generate(sd1["ours"], ROW).latents
    with loras_applied(sd1["ours"].model, adapters):
        lora32 = generate(sd1["ours"], ROW).latents
    bound = 3 * rel(base, base32)
    for merge in (False, True):
        with loras_applied(pipe.model, adapters, merge):
            out = generate(pipe, ROW).latents
        assert rel(out, lora32) < bound < rel(base32, lora32), f"merge={merge}: {rel(out, lora32):.3f}"
    assert_restored(pipe.model, before)
    assert torch.equal(generate(pipe, ROW).latents, base)


def test_exception_inside_a_call_leaves_the_weights_in_place(sd1):
    """A call that fails midway (here: a context of the wrong width) does not leave a swapped weight."""
    model = sd1["ours"].model
    before = state(model)
    proj_in = model.unet.input_blocks[1][1].proj_in
    weight = proj_in.weight
    with loras_applied(model, [(sd1["files"]["kohya"], 1.0)]):
        with pytest.raises(RuntimeError):
            model.unet(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 63))
        assert proj_in.weight is weight
    assert_restored(model, before)


# ----------------------------------------------------------------------------- SDXL

def sdxl_outputs(te1, te2, unet_fn, ids, ids2, x, t, time_ids):
    """(context part 1, part 2, pooled, UNet eps) with one model's encoders and UNet."""
    a, (b, pooled) = te1(ids), te2(ids2)
    return a, b, pooled, unet_fn(x, t, torch.cat([a, b], -1), pooled, time_ids)


@pytest.mark.parametrize("which,merge", [("kohya", False), ("both", False), ("both", True)])   # "both": PEFT too
def test_sdxl_text_encoders_and_unet_match_diffusers_fused(sdxl, which, merge):
    adapters = adapter_set(sdxl["files"], which)
    ref = build_reference_sdxl(SDXL_TEST)
    fuse_into(StableDiffusionXLPipeline(scheduler=sdxl_scheduler(EulerDiscreteScheduler), **ref), adapters)
    ids = ref["tokenizer"](["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = ref["tokenizer_2"](["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, time_ids = torch.tensor([500.0]), torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])

    def ref_te2(i):
        out = ref["text_encoder_2"](i, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def ref_unet(x, t, ctx, pooled, time_ids):
        return ref["unet"](x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    model = sdxl["ours"].model

    def our_unet(x, t, ctx, pooled, time_ids):
        return model.unet(x, t, ctx, sdxl_vector(pooled, time_ids))

    ours = (model.text_encoder, model.text_encoder_2.forward_with_pooled, our_unet, ids, ids2, x, t, time_ids)
    before = state(model)
    with torch.no_grad():
        want = sdxl_outputs(lambda i: ref["text_encoder"](i, output_hidden_states=True).hidden_states[-2], ref_te2,
                            ref_unet, ids, ids2, x, t, time_ids)
        base = sdxl_outputs(*ours)
        with loras_applied(model, adapters, merge):
            got = sdxl_outputs(*ours)
    for name, g, w, b in zip(("CLIP ViT-L", "OpenCLIP ViT-bigG", "pooled", "UNet"), got, want, base):
        assert_module_close(f"SDXL {name}, {which}{', merged' * merge}", g, w, b)
    assert_restored(model, before)


def test_sdxl_image_matches_diffusers_fused(sdxl):
    adapters = adapter_set(sdxl["files"], "both")
    ref = build_reference_sdxl(SDXL_TEST)
    fuse_into(StableDiffusionXLPipeline(scheduler=sdxl_scheduler(EulerDiscreteScheduler), **ref), adapters)
    row = GenerationRow("a lighthouse", negative_prompt="fog", seed=8, steps=3, cfg_scale=6.0, sampler="euler",
                        width=64, height=64)
    image_ref, latents_ref = sdxl_run(ref, sdxl_scheduler(EulerDiscreteScheduler), row)
    with loras_applied(sdxl["ours"].model, adapters):
        out = generate(sdxl["ours"], row)
    assert_images_close("SDXL image, kohya + peft", out, image_ref, latents_ref)


# ----------------------------------------------------------------------------- SD 2.x (OpenCLIP's fused q/k/v)

def test_sd2_fused_in_proj_and_linear_proj_match_diffusers_fused(tmp_path):
    ref = build_reference_sd2(SD2_TEST, "epsilon", seed=20)
    path = write_sd2_single_file(tmp_path / "sd2.safetensors", ref)
    ours = Pipeline.load(path, device="cpu", dtype="fp32", prediction_type="epsilon").model
    lora = write_kohya_lora(tmp_path / "sd2_kohya.safetensors", ref["unet"], {"te": ref["text_encoder"]}, seed=5)
    ids = ref["tokenizer"](["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([250.0])
    with torch.no_grad():
        base_ctx = ours.text_encoder(ids)
        base_eps = ours.unet(x, t, base_ctx)
    parts = {k: ref[k] for k in ("vae", "text_encoder", "tokenizer", "unet")}
    fuse_into(StableDiffusionPipeline(scheduler=reference_scheduler("euler"), safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False, **parts), [(lora, 0.6)])
    with torch.no_grad():
        want_ctx = ref["text_encoder"](ids).last_hidden_state
        want_eps = ref["unet"](x, t, want_ctx).sample
        with loras_applied(ours, [(lora, 0.6)]):
            got_ctx = ours.text_encoder(ids)
            got_eps = ours.unet(x, t, want_ctx)
    assert_module_close("SD 2.x OpenCLIP (fused q/k/v)", got_ctx, want_ctx, base_ctx)
    assert_module_close("SD 2.x UNet (linear proj)", got_eps, want_eps, base_eps)


# ----------------------------------------------------------------------------- bad files

def test_a_lora_for_another_family_is_named(sd1, sdxl):
    before = state(sd1["ours"].model)
    with pytest.raises(LoraError, match=r"this LoRA is for SDXL; the model is SD 1\.x"):
        apply_loras(sd1["ours"].model, [(sd1["files"]["kohya"], 1.0), (sdxl["files"]["kohya"], 1.0)])
    # (tiny widths: SD 1.x or 2.x by structure; released files are told apart by their 768/1024 widths)
    with pytest.raises(LoraError, match=r"this LoRA is for SD 1\.x/2\.x; the model is SDXL"):
        apply_loras(sdxl["ours"].model, [(sd1["files"]["peft"], 1.0)])
    assert_restored(sd1["ours"].model, before)   # the first, good file was not installed either


def write(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file
    save_file(tensors, str(path))
    return path


def test_bad_files_are_named_with_their_first_keys(sd1, tmp_path):
    model = sd1["ours"].model
    good = read_lora(sd1["files"]["kohya"])
    first = good.layers[0]
    name = first.key.removesuffix(".lora_down.weight")
    pair = {f"{name}.lora_down.weight": first.down, f"{name}.lora_up.weight": first.up}
    cases = {
        "missing.safetensors": (None, r"does not exist"),
        "unknown_module.safetensors": ({"lora_unet_nowhere_block_to_q.lora_down.weight": torch.zeros(4, 64),
                                        "lora_unet_nowhere_block_to_q.lora_up.weight": torch.zeros(64, 4)},
                                       r"unknown_module\.safetensors: 1 of its 1 layers match no module of the "
                                       r"SD 1\.x model \(first: lora_unet_nowhere_block_to_q\.lora_down\.weight\)"),
        "wrong_shape.safetensors": ({f"{name}.lora_down.weight": torch.zeros(4, first.down.shape[1] + 1),
                                     f"{name}.lora_up.weight": first.up},
                                    r"do not fit the SD 1\.x model's shapes \(first: " + name),
        "unpaired.safetensors": ({f"{name}.lora_down.weight": first.down}, r"without their up weights"),
        "loha.safetensors": ({**pair, f"{name}.hada_w1_a": torch.zeros(2, 2)}, r"LyCORIS LoHa"),
        "full_diff.safetensors": ({**pair, f"{name}.diff": torch.zeros(2, 2)}, r"is a full-weight diff"),
        "checkpoint.safetensors": ({"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3),
                                    "first_stage_model.decoder.conv_out.bias": torch.zeros(3)},
                                   r"is a full model checkpoint, not a LoRA: give it as --model"),
        "stray_key.safetensors": ({**pair, "something_else": torch.zeros(1)}, r"not LoRA down/up/alpha.*something_else"),
        "vector_alpha.safetensors": ({**pair, f"{name}.alpha": torch.tensor([1.0, 2.0])},
                                     name + r"\.alpha is \[2\], not one finite number"),
        "nan_alpha.safetensors": ({**pair, f"{name}.alpha": torch.tensor(float("nan"))}, r"not one finite number"),
        # released SD 2.x files: a 1024-wide cross-attention context (SD 1.x: 768)
        "sd2.safetensors": ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                             torch.zeros(4, 1024),
                             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
                             torch.zeros(320, 4)}, r"this LoRA is for SD 2\.x; the model is SD 1\.x"),
    }
    for file, (tensors, message) in cases.items():
        path = tmp_path / file if tensors is None else write(tmp_path / file, tensors)
        with pytest.raises(LoraError, match=message):
            apply_loras(model, [(path, 1.0)])
    assert not [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]


def test_alpha_and_multiplier_scale_the_side_path(sd1, tmp_path):
    """scale = multiplier * alpha / rank: a file with alpha 2r at multiplier 0.25 equals alpha r at 0.5."""
    layers = read_lora(sd1["files"]["kohya"]).layers
    rank = layers[0].down.shape[0]

    def file(alpha: float) -> Path:
        sd = {}
        for layer in layers:
            name = layer.key.removesuffix(".lora_down.weight")
            sd.update({f"{name}.lora_down.weight": layer.down, f"{name}.lora_up.weight": layer.up,
                       f"{name}.alpha": torch.tensor(alpha)})
        return write(tmp_path / f"alpha{alpha}.safetensors", sd)

    model, x, t, ctx = sd1["ours"].model, torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 77, 64)
    with loras_applied(model, [(file(2.0 * rank), 0.25)]):
        a = model.unet(x, t, ctx)
    with loras_applied(model, [(file(float(rank)), 0.5)]):
        b = model.unet(x, t, ctx)
    base = model.unet(x, t, ctx)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - base).abs().max() > 1e-2


def test_older_diffusers_names_read_as_the_peft_file(sd1, tmp_path):
    """diffusers' pre-PEFT names (`.lora.down/.up` on UNet layers, attention processors' `to_q_lora`,
    `.lora_linear_layer.down/.up` on the text encoder, alphas as `.alpha` keys) adapt the same layers."""
    from safetensors import safe_open

    with safe_open(str(sd1["files"]["peft"]), "pt") as f:
        peft = {k: f.get_tensor(k) for k in f.keys()}
    old = {}
    for key, value in peft.items():
        module, kind = key.rsplit(".lora_", 1)
        direction = {"A.weight": "down", "B.weight": "up"}[kind]
        if module.startswith("text_encoder."):
            old[f"{module}.lora_linear_layer.{direction}.weight"] = value
        elif module.endswith((".attn1.to_q", ".attn2.to_k")):
            head, proj = module.rsplit(".", 1)
            old[f"{head}.processor.{proj}_lora.{direction}.weight"] = value
        else:
            old[f"{module}.lora.{direction}.weight"] = value
        old[f"{module}.alpha"] = torch.tensor(8.0)           # write_peft_lora's lora_alpha
    old_file = write(tmp_path / "old.safetensors", old)
    model, x, t = sd1["ours"].model, torch.randn(1, 4, 8, 8), torch.tensor([300.0])
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 73])
    outs = []
    for file in (sd1["files"]["peft"], old_file):
        with loras_applied(model, [(file, 0.7)]):
            ctx = model.text_encoder(ids)
            outs.append((ctx, model.unet(x, t, ctx)))
    assert torch.equal(outs[0][0], outs[1][0])
    # equal to rounding: the hooks are installed in another order
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=1e-5)
    assert (outs[0][1] - model.unet(x, t, outs[0][0])).abs().max() > 0.1


def test_lora_hash_is_a1111s(tmp_path):
    """A1111's LoRA hash: sha256 of a .safetensors file's tensor data (its header and metadata left out),
    of the whole file otherwise."""
    import hashlib
    from safetensors.torch import save_file

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(8.0).view(2, 4)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"ss_note": "one"})
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"ss_note": "another, longer"})
    data = torch.arange(8.0).numpy().tobytes()
    assert lora_hash(tmp_path / "a.safetensors") == lora_hash(tmp_path / "b.safetensors") == \
        hashlib.sha256(data).hexdigest()
    torch.save(tensors, tmp_path / "c.pt")
    assert lora_hash(tmp_path / "c.pt") == hashlib.sha256((tmp_path / "c.pt").read_bytes()).hexdigest()

