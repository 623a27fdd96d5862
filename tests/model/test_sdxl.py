"""SDXL end to end: batchsd against diffusers' StableDiffusionXL(Img2Img)Pipeline on the same random
weights, loaded from an sgm-layout single file (as A1111 and ComfyUI load it) and from a diffusers
folder; and the released SDXL base key set (../shared/reference/sdxl_base_keys.json).

The models (ref_sdxl.SDXL_TEST) have SDXL base's real topology with small widths: 3 UNet levels,
transformer depth 0/2/10 and 10 in the middle, 64-wide heads, linear projections, `label_emb` for the
pooled text + size/crop vector, two text encoders read at their penultimate layers (the CLIP one's
file holds one more layer and a final norm, which must not be run), "!"-padded tokens for the second.

Tolerances as the SD 1.x parity tests': images within 1/255 on at least 99.9% of pixel values;
final latents within 2e-3 relative (max abs diff / max abs of the reference); text conditioning
within 1e-4.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from batchsd import GenerationRow, Pipeline  # noqa: E402
from batchsd.errors import CheckpointError, InputError  # noqa: E402
from batchsd.model.checkpoint import inspect_checkpoint, load_model  # noqa: E402
from batchsd.model.config import SDXL as SDXL_CONFIG  # noqa: E402
from batchsd.model.family import SDXL, detect_family, resolve_family  # noqa: E402
from batchsd.model.stable_diffusion import StableDiffusionXLModel  # noqa: E402
from batchsd.model.tokenizer import SD2_PAD_TOKEN, tokenize  # noqa: E402

from ref_sdxl import (SDXL_TEST, build_reference_sdxl, reference_scheduler, sdxl_run,  # noqa: E402
                      write_sdxl_folder, write_sdxl_single_file)
from test_pipeline_parity import REFERENCE_SCHEDULERS, init_image  # noqa: E402   (sampler -> diffusers class)
from image_parity import FIGURES, assert_image_parity  # noqa: E402

LATENT_REL_TOL = 2e-3
TEXT_TOL = 1e-4
LONG_PROMPT = "a very detailed painting of a lighthouse on a cliff at dusk, " * 8   # > 77 tokens
KEYS_FILE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "sdxl_base_keys.json"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("sdxl")
    ref = build_reference_sdxl(SDXL_TEST)
    path = write_sdxl_single_file(folder / "sdxl.safetensors", ref)
    return dict(ref=ref, path=path, ours=Pipeline.load(path, device="cpu", dtype="fp32"))


def reference_run(ref: dict, sampler: str, row: GenerationRow, **kwargs):
    cls, extra = REFERENCE_SCHEDULERS[sampler]
    return sdxl_run(ref, reference_scheduler(cls, **extra), row, **kwargs)


def assert_close(name: str, out, image_ref: np.ndarray, latents_ref: torch.Tensor, index: int = 0) -> None:
    assert_image_parity(name, out.images[index], out.latents[index:index + 1], image_ref, latents_ref, LATENT_REL_TOL)


# ----------------------------------------------------------------------------- the released layout

@pytest.mark.skipif(not KEYS_FILE.is_file(), reason="../shared/reference/sdxl_base_keys.json not present")
def test_model_has_exactly_the_released_sdxl_base_keys():
    """StableDiffusionXLModel(SDXL) has every tensor of an SDXL base single file at its shape; the file's
    others are exactly what SDXL does not run (CLIP ViT-L's last layer and final norm); its shapes
    resolve to the SDXL family and preset."""
    released = {k: tuple(v) for k, v in json.loads(KEYS_FILE.read_text()).items()}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in StableDiffusionXLModel(SDXL_CONFIG).state_dict().items()}
    assert all(released.get(k) == shape for k, shape in ours.items())
    family, cfg = resolve_family(released)
    assert family is SDXL and cfg == SDXL_CONFIG and cfg.name == "sdxl"
    unused = sorted(k for k in released if k not in ours)
    assert len(unused) == 18 and all(family.ignored(k, cfg) for k in unused)
    assert all(".layers.11." in k or ".final_layer_norm." in k for k in unused)
    params = sum(np.prod(s) for k, s in ours.items() if k.startswith("model.diffusion_model."))
    assert abs(params / 1e6 - 2567.46) < 0.01


def test_refiner_and_partial_files_are_named():
    refiner = {"conditioner.embedders.0.model.token_embedding.weight": (49408, 1280),
               "model.diffusion_model.label_emb.0.0.weight": (1536, 2560)}
    with pytest.raises(CheckpointError, match="SDXL refiner"):
        detect_family(refiner)


# ----------------------------------------------------------------------------- text

@torch.no_grad()
def test_text_conditioning_matches_diffusers(model):
    """Context = both encoders' hidden_states[-2] concatenated; pooled = text_embeds of the second."""
    ref = model["ref"]
    prompts = ["a photo of a cat", "", "wow! a dog!!", LONG_PROMPT]
    ours = SDXL.encode_text(model["ours"].model, prompts, torch.device("cpu"))
    ids = ref["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids_2 = ref["tokenizer_2"](prompts, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    assert torch.equal(ids, tokenize(prompts)[0]) and torch.equal(ids_2, tokenize(prompts, SD2_PAD_TOKEN)[0])
    first = ref["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
    second = ref["text_encoder_2"](ids_2, output_hidden_states=True)
    context = torch.cat([first, second.hidden_states[-2]], dim=-1)
    diff = (ours.context - context).abs().max().item()
    pooled_diff = (ours.pooled - second.text_embeds).abs().max().item()
    FIGURES.append(f"text context max |diff| {diff:.1e}, pooled {pooled_diff:.1e}")
    assert ours.context.shape == (4, 77, 128) and ours.pooled.shape == (4, 32)
    assert diff <= TEXT_TOL and pooled_diff <= TEXT_TOL
    assert ours.truncated == [False, False, False, True]


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
def test_txt2img_matches_diffusers(model, sampler):
    row = GenerationRow("a red cube on a table", negative_prompt="blurry", seed=3, steps=4, cfg_scale=7.5,
                        sampler=sampler, width=96, height=64)
    out = model["ours"].generate([row])
    assert out.images[0].size == (96, 64)
    assert_close(f"t2i {sampler} 96x64", out, *reference_run(model["ref"], sampler, row))


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler_a"])
def test_img2img_matches_diffusers(model, sampler):
    row = GenerationRow("a watercolor landscape", negative_prompt="dull", seed=7, steps=6, cfg_scale=5.0,
                        sampler=sampler, init_image=init_image(72, 64, 7), strength=0.6)
    out = model["ours"].generate([row])
    assert out.images[0].size == (72, 64)
    assert_close(f"i2i {sampler} 72x64", out, *reference_run(model["ref"], sampler, row))


def test_empty_negative_prompt_is_zero_conditioning_as_diffusers(model):
    """An empty negative prompt: diffusers' force_zeros_for_empty_prompt (negative_prompt None)."""
    row = GenerationRow("a cat in a hat", seed=9, steps=3, cfg_scale=6.0, sampler="euler", width=64, height=64)
    assert_close("t2i empty negative", model["ours"].generate([row]), *reference_run(model["ref"], "euler", row))


def test_size_and_crop_conditioning_match_diffusers(model):
    row = GenerationRow("a cat", negative_prompt="dog", seed=4, steps=3, cfg_scale=7.0, sampler="dpmpp_2m",
                        width=64, height=80, original_width=1024, original_height=768, crop_top=32, crop_left=16)
    plain = GenerationRow("a cat", negative_prompt="dog", seed=4, steps=3, cfg_scale=7.0, sampler="dpmpp_2m",
                          width=64, height=80)
    out = model["ours"].generate([row, plain])
    assert_close("t2i original 1024x768 crop 32,16", out,
                 *reference_run(model["ref"], "dpmpp_2m", row, original_size=(768, 1024), crop=(32, 16)))
    assert_close("t2i default size/crop (batched)", out, *reference_run(model["ref"], "dpmpp_2m", plain), index=1)
    assert not torch.equal(out.latents[0], out.latents[1])     # the conditioning changes the image


def test_long_prompt_and_cfg_one_match_diffusers(model):
    long_row = GenerationRow(LONG_PROMPT, negative_prompt=LONG_PROMPT[::-1], seed=11, steps=3, cfg_scale=6.0,
                             sampler="ddim", width=64, height=64)
    out = model["ours"].generate([long_row])
    assert out.prompt_truncated == [True]
    assert_close("t2i long prompt", out, *reference_run(model["ref"], "ddim", long_row))
    one = GenerationRow("a cat", seed=5, steps=4, cfg_scale=1.0, sampler="euler", width=64, height=64)
    assert_close("t2i cfg 1", model["ours"].generate([one]), *reference_run(model["ref"], "euler", one))


def test_size_conditioning_refused_by_other_families():
    pipe = Pipeline.load("tiny", device="cpu", dtype="fp32")
    with pytest.raises(InputError, match="row 0, original_width: .*SDXL"):
        pipe.generate([GenerationRow("a", steps=1, width=64, height=64, original_width=512)])


def test_tolerances_catch_real_bugs(model):
    """Far below what a wrong choice gives: encoding "" for the empty negative prompt instead of zeros,
    and no size conditioning (zero vector) are both caught."""
    ours, ref = model["ours"], model["ref"]
    row = GenerationRow("a red cube", seed=3, steps=3, cfg_scale=7.5, sampler="euler", width=64, height=64)
    image_ref, latents_ref = reference_run(ref, "euler", row)
    zero = ours._encode_text([GenerationRow("a", negative_prompt="")], 1, negative=True)
    assert zero.context.abs().max() == 0 and zero.pooled.abs().max() == 0
    encoded = ours._encode_text([GenerationRow("")], 1)
    assert encoded.context.abs().max() > 0
    try:
        ours.family = type(ours.family)(**{**ours.family.__dict__, "zero_empty_negative": False})
        wrong = ours.generate([row])
    finally:
        ours.family = SDXL
    rel = ((wrong.latents - latents_ref).abs().max() / latents_ref.abs().max()).item()
    FIGURES.append(f"bug: empty negative encoded, latents rel {rel:.1e}")
    assert rel > 20 * LATENT_REL_TOL


# ----------------------------------------------------------------------------- loading

def test_diffusers_folder_loads_the_same_model(model, tmp_path):
    """A diffusers SDXL folder (text_encoder_2 as CLIPTextModelWithProjection, its projection transposed
    into OpenCLIP's orientation) gives the single file's model: equal tensors, the same images."""
    folder = write_sdxl_folder(tmp_path / "sdxl", model["ref"])
    from_folder, info = load_model(folder, dtype=torch.float32)
    assert info.family == "sdxl" and info.config.unet == SDXL_TEST.unet and info.config.clip2 == SDXL_TEST.clip2
    from_file = model["ours"].model.state_dict()
    folder_sd = from_folder.state_dict()
    assert folder_sd.keys() == from_file.keys()
    assert all(torch.equal(folder_sd[k], from_file[k].contiguous()) for k in folder_sd)
    pipe = Pipeline.load(folder, device="cpu", dtype="fp32")
    assert pipe.default_size == 1024 and pipe.family.scheduler.timestep_spacing == "leading"
    row = GenerationRow("a red cube", negative_prompt="blurry", seed=3, steps=3, sampler="euler", width=64, height=64)
    assert torch.equal(pipe.generate([row]).latents, model["ours"].generate([row]).latents)


def test_folder_configs_are_part_of_the_identity(model, tmp_path):
    """Two folders with the same weights and different config.json files are two models (two hashes)."""
    first = write_sdxl_folder(tmp_path / "a", model["ref"])
    second = write_sdxl_folder(tmp_path / "b", model["ref"])
    config = json.loads((second / "vae" / "config.json").read_text())
    (second / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.2}))
    a, b = inspect_checkpoint(first), inspect_checkpoint(second)
    assert a["sha256"] != b["sha256"] and b["config_detail"]["vae"]["scaling_factor"] == 0.2


def test_folder_with_pytorch_model_bin_text_encoders(model, tmp_path):
    """transformers' older weight name (pytorch_model.bin) beside nothing else loads the same."""
    folder = write_sdxl_folder(tmp_path / "sdxl", model["ref"])
    for name in ("text_encoder", "text_encoder_2"):
        sd = model["ref"][name].state_dict()
        (folder / name / "model.safetensors").unlink()
        torch.save({k: v.contiguous() for k, v in sd.items()}, folder / name / "pytorch_model.bin")
    loaded, _ = load_model(folder, dtype=torch.float32)
    ours = model["ours"].model
    assert torch.equal(loaded.text_encoder_2.text_projection, ours.text_encoder_2.text_projection)
    assert torch.equal(loaded.text_encoder.encoder.layers[0].mlp.fc1.weight, ours.text_encoder.encoder.layers[0].mlp.fc1.weight)


def test_inspect_names_sdxl(model):
    info = inspect_checkpoint(model["path"], hash=False)
    assert info["family"] == "SDXL" and info["loadable"] and info["default_size"] == 1024
    assert info["components"]["text_encoder_2"] > 0 and info["ignored"] > 0 and not info["extra"]


def test_fp16_runs_the_vae_in_fp32():
    """force_upcast: under fp16 the VAE's weights are fp32 (diffusers upcasts it to decode)."""
    model = StableDiffusionXLModel.random(SDXL_TEST)
    pipe = Pipeline(model, torch.device("cpu"), torch.float16, name="x", family=SDXL, pack_weights=False)
    assert pipe.vae_dtype == torch.float32 and pipe.model.vae.decoder.conv_in.weight.dtype == torch.float32
    assert pipe.model.unet.out[2].weight.dtype == torch.float16
    bf16 = Pipeline(StableDiffusionXLModel.random(SDXL_TEST), torch.device("cpu"), torch.bfloat16, name="x",
                    family=SDXL, pack_weights=False)
    assert bf16.vae_dtype == torch.bfloat16


@torch.no_grad()
def test_a1111_syntax_on_sdxl(model):
    """A1111 syntax reads both encoders (the OpenCLIP one padded with 0 after the end token): a short
    plain prompt gives the plain syntax's bits, context and pooled; a long prompt is 3 chunks, its
    pooled embedding the first chunk's; emphasis changes both encoders' states."""
    from batchsd.model.text_conditioning import encode_prompts

    sdxl, cpu = model["ours"].model, torch.device("cpu")
    plain = encode_prompts(SDXL, sdxl, ["a photo of a cat"], cpu, "plain")[0]
    a1111 = encode_prompts(SDXL, sdxl, ["a photo of a cat", LONG_PROMPT, "a photo of a (cat:1.4)"], cpu, "a1111")
    assert torch.equal(plain.context, a1111[0].context) and torch.equal(plain.pooled, a1111[0].pooled)
    assert a1111[1].context.shape == (77 * 2, 128)
    from batchsd.model.prompt_syntax import chunk_prompt, fragment_tokenizer
    chunks = chunk_prompt(LONG_PROMPT, fragment_tokenizer())
    _, first_pooled = SDXL.encode_chunks(sdxl, torch.tensor([chunks[0].ids]), cpu)
    assert torch.equal(a1111[1].pooled, first_pooled[0])
    changed = (a1111[2].context - a1111[0].context).abs().amax(dim=0)
    assert changed[:64].max() > 1e-3 and changed[64:].max() > 1e-3
    row = GenerationRow(LONG_PROMPT, negative_prompt="blurry", seed=1, steps=2, width=64, height=64,
                        prompt_syntax="a1111")
    assert model["ours"].generate([row]).latents.isfinite().all()
