"""SD 2.x end to end: batchsd against diffusers' StableDiffusion(Img2Img)Pipeline on the same random
weights, for both prediction types (2.x-base epsilon, 2.x 768-v v-prediction), loaded from a
released-style single file and from a diffusers folder.

The models (ref_sd2.SD2_TEST) have SD 2.x's real topology with small widths: 4 UNet levels, 2 res
blocks, attention on the first 3 levels and the middle block, linear proj_in/proj_out, 64-wide heads
(1, 2, 4, 4 heads), a GELU OpenCLIP-layout text encoder read at its penultimate block (the file holds
one more block, random, which must not be run), "!"-padded tokens.

Tolerances as the SD 1.x parity tests': images within 1/255 on at least 99.9% of pixel values;
final latents within 2e-3 relative (max abs diff / max abs of the reference); the text encoder
alone within 1e-4 (measured about 1e-6).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)

from batchsd import GenerationRow, Pipeline  # noqa: E402
from batchsd.errors import CheckpointError  # noqa: E402
from batchsd.model.checkpoint import inspect_checkpoint, load_model  # noqa: E402
from batchsd.model.family import SD2_EPS, SD2_V, AmbiguousPredictionType  # noqa: E402
from batchsd.model.openclip import OpenCLIPTextModel  # noqa: E402
from batchsd.model.tokenizer import SD2_PAD_TOKEN, tokenize  # noqa: E402

from ref_sd2 import (SD2_TEST, build_reference_sd2, reference_scheduler, sd2_tokenizer,  # noqa: E402
                     write_ldm_yaml, write_sd2_folder, write_sd2_single_file)
from test_pipeline_parity import diffusers_run, init_image  # noqa: E402
from image_parity import FIGURES, assert_image_parity  # noqa: E402

LATENT_REL_TOL = 2e-3
TEXT_TOL = 1e-4
PREDICTIONS = ["epsilon", "v_prediction"]
REFERENCE_SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}
LONG_PROMPT = "a very detailed painting of a lighthouse on a cliff at dusk, " * 8   # > 77 tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Per prediction type: reference components, the single file (the v file with its yaml, the
    epsilon one loaded with the explicit argument) and batchsd's pipeline from it."""
    out = {}
    for seed, prediction in ((20, "epsilon"), (40, "v_prediction")):
        folder = tmp_path_factory.mktemp(prediction)
        ref = build_reference_sd2(SD2_TEST, prediction, seed=seed)
        path = write_sd2_single_file(folder / "model.safetensors", ref)
        if prediction == "v_prediction":
            write_ldm_yaml(folder / "model.yaml", prediction)
            ours = Pipeline.load(path, device="cpu", dtype="fp32")
        else:
            ours = Pipeline.load(path, device="cpu", dtype="fp32", prediction_type="epsilon")
        out[prediction] = dict(ref=ref, path=path, ours=ours)
    return out


def reference_run(ref: dict, prediction: str, sampler: str, row: GenerationRow) -> tuple[np.ndarray, torch.Tensor]:
    cls, extra = REFERENCE_SCHEDULERS[sampler]
    parts = dict(vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=ref["tokenizer"], unet=ref["unet"],
                 scheduler=reference_scheduler(cls, prediction, **extra), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    return diffusers_run(parts, row)


def assert_close(name: str, out, image_ref: np.ndarray, latents_ref: torch.Tensor) -> None:
    assert_image_parity(name, out.images[0], out.latents, image_ref, latents_ref, LATENT_REL_TOL)


# ----------------------------------------------------------------------------- text

def test_tokenizer_pads_with_bang_as_sd2():
    prompts = ["a photo of a cat", "", "wow! a dog!!", LONG_PROMPT]
    ids, truncated = tokenize(prompts, pad_token=SD2_PAD_TOKEN)
    expected = sd2_tokenizer()(prompts, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    assert torch.equal(ids, expected) and truncated == [False, False, False, True]
    assert ids[0, 7:].eq(0).all() and ids[3, -1] == 49407          # "!" padding; a cut prompt still ends in EOS
    sd1 = tokenize(prompts)[0]
    assert torch.equal(sd1[0, :7], ids[0, :7]) and sd1[0, 7:].eq(49407).all()   # the same BPE as SD 1.x
    assert ids[2, :8].tolist() == [49406, 2781, 0, 320, 1929, 0, 0, 49407]  # "!" is split out, as diffusers does


def test_openclip_rename_matches_the_independent_writer(models):
    """diffusers_layout's transformers -> OpenCLIP mapping (what a folder loads through) gives exactly the
    tensors of ref_sd2's independent writer, fused q/k/v included, with and without `text_model.`."""
    from batchsd.model.diffusers_layout import diffusers_to_original
    from ref_sd2 import openclip_state_dict

    text = models["epsilon"]["ref"]["text_encoder"]
    expected = openclip_state_dict(text, extras=False)
    for sd in (text.state_dict(), {"text_model." + k.removeprefix("text_model."): v for k, v in
                                   text.state_dict().items()}):
        got = diffusers_to_original("text_encoder_openclip", sd)
        got.pop("position_ids", None)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@torch.no_grad()
def test_text_encoder_matches_transformers(models, prediction):
    """The penultimate-layer OpenCLIP encoder (the file's last block unused) = diffusers' text encoder."""
    m = models[prediction]
    ids, _ = tokenize(["a photo of a cat", "", "wow! a dog!!", LONG_PROMPT], pad_token=SD2_PAD_TOKEN)
    ours = m["ours"].model.text_encoder
    assert len(ours.transformer.resblocks) == SD2_TEST.clip.layers        # the file has one more
    diff = (ours(ids) - m["ref"]["text_encoder"](ids).last_hidden_state).abs().max().item()
    FIGURES.append(f"text encoder {prediction:13s} max |diff| {diff:.1e}")
    assert diff <= TEXT_TOL


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_txt2img_matches_diffusers(models, prediction, sampler):
    row = GenerationRow("a red cube on a table", negative_prompt="blurry", seed=3, steps=4, cfg_scale=7.5,
                        sampler=sampler, width=96, height=64)
    out = models[prediction]["ours"].generate([row])
    assert out.images[0].size == (96, 64)
    assert_close(f"t2i {prediction} {sampler} 96x64", out, *reference_run(models[prediction]["ref"], prediction,
                                                                             sampler, row))


@pytest.mark.parametrize("prediction,sampler", [("epsilon", "dpmpp_2m_karras"), ("v_prediction", "euler_a")])
def test_img2img_matches_diffusers(models, prediction, sampler):
    row = GenerationRow("a watercolor landscape", seed=7, steps=6, cfg_scale=5.0, sampler=sampler,
                        init_image=init_image(72, 64, 7), strength=0.6)
    out = models[prediction]["ours"].generate([row])
    assert out.images[0].size == (72, 64)
    assert_close(f"i2i {prediction} {sampler} 72x64", out, *reference_run(models[prediction]["ref"], prediction,
                                                                            sampler, row))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_long_prompt_truncated_as_diffusers(models, prediction):
    row = GenerationRow(LONG_PROMPT, negative_prompt=LONG_PROMPT[::-1], seed=11, steps=3, cfg_scale=6.0,
                        sampler="ddim", width=64, height=64)
    out = models[prediction]["ours"].generate([row])
    assert out.prompt_truncated == [True]
    assert_close(f"t2i {prediction} long prompt", out, *reference_run(models[prediction]["ref"], prediction,
                                                                        "ddim", row))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_cfg_one_matches_diffusers(models, prediction):
    row = GenerationRow("a cat", seed=5, steps=4, cfg_scale=1.0, sampler="euler", width=64, height=64)
    out = models[prediction]["ours"].generate([row])
    assert_close(f"t2i {prediction} cfg 1", out, *reference_run(models[prediction]["ref"], prediction, "euler", row))


def test_tolerances_catch_real_bugs(models):
    """The tolerances sit far below what a wrong choice gives: v-prediction weights sampled as epsilon,
    the text encoder's last block run (the final, not the penultimate layer), <|endoftext|> padding."""
    from dataclasses import replace
    from safetensors.torch import load_file

    m = models["v_prediction"]
    row = GenerationRow("a red cube on a table", negative_prompt="blurry", seed=3, steps=4, cfg_scale=7.5,
                        sampler="euler", width=64, height=64)
    _, latents_ref = reference_run(m["ref"], "v_prediction", "euler", row)
    pipe = m["ours"]
    try:
        pipe.family = SD2_EPS
        wrong = pipe.generate([row]).latents
    finally:
        pipe.family = SD2_V
    rel = ((wrong - latents_ref).abs().max() / latents_ref.abs().max()).item()
    FIGURES.append(f"v-prediction weights sampled as epsilon: latents rel {rel:.1e} (a bug the tolerance must catch)")
    assert rel > 50 * LATENT_REL_TOL, rel

    ids, _ = tokenize(["a photo of a cat"], pad_token=SD2_PAD_TOKEN)
    with torch.no_grad():
        expected = m["ref"]["text_encoder"](ids).last_hidden_state
        eos_padded = pipe.model.text_encoder(tokenize(["a photo of a cat"])[0])
        prefix = "cond_stage_model.model."
        file = {k[len(prefix):]: v for k, v in load_file(str(m["path"])).items() if k.startswith(prefix)}
        every_block = OpenCLIPTextModel(replace(SD2_TEST.clip, layers=SD2_TEST.clip.layers + 1))
        every_block.load_state_dict({k: v for k, v in file.items() if k not in ("text_projection", "logit_scale")})
        final_layer = every_block.eval()(ids)
    for name, got in (("<|endoftext|> padding", eos_padded), ("last block run", final_layer)):
        diff = (got - expected).abs().max().item()
        FIGURES.append(f"text encoder with {name}: max |diff| {diff:.1e} (a bug the tolerance must catch)")
        assert diff > 100 * TEXT_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_unet_16bit_matches_diffusers(models, dtype):
    """In 16 bits, the 768-v UNet (upcast_attention=True in its diffusers config) is as close to
    diffusers' fp32 output as diffusers' own 16-bit forward is: diffusers' default attention
    processor (SDPA) does not upcast, and neither does batchsd."""
    m = models["v_prediction"]
    assert m["ref"]["unet"].config.upcast_attention
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([700.0, 700.0]), torch.randn(2, 77, 64, generator=g)
    ours, _ = load_model(m["path"], dtype=dtype, prediction_type="v_prediction")
    got = ours.unet(x.to(dtype), t, ctx.to(dtype)).float()
    ref16 = copy.deepcopy(m["ref"]["unet"]).to(dtype)(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype)).sample.float()
    ref32 = m["ref"]["unet"](x, t, encoder_hidden_states=ctx).sample

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    floor = rel(ref16, ref32)
    FIGURES.append(f"UNet {str(dtype)[6:]:8s} ours vs diffusers {rel(got, ref16):.1e}, ours vs fp32 "
                   f"{rel(got, ref32):.1e}, diffusers vs fp32 (the floor) {floor:.1e}")
    assert rel(got, ref32) <= 1.5 * floor and rel(got, ref16) <= 2 * floor


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_diffusers_folder_matches_diffusers(models, prediction, tmp_path):
    """A diffusers folder: its configs say the prediction type and the default size (unet sample_size x 8);
    batchsd's tensors equal the single file's (fused q/k/v read from the three diffusers tensors) and
    its images equal those of diffusers' own from_pretrained of the folder."""
    m = models[prediction]
    folder = write_sd2_folder(tmp_path / "sd2", m["ref"], prediction)
    ours = Pipeline.load(folder, device="cpu", dtype="fp32")
    family = SD2_V if prediction == "v_prediction" else SD2_EPS
    assert ours.family.name == family.name
    # the folder's scheduler config is read: DDIMScheduler saved its default spacing with it
    assert ours.family.scheduler == dataclasses.replace(family.scheduler, timestep_spacing="leading")
    assert ours.default_size == (768 if prediction == "v_prediction" else 512)
    single = m["ours"].model.state_dict()
    folder_sd = ours.model.state_dict()
    assert folder_sd.keys() == single.keys() and all(torch.equal(folder_sd[k], single[k]) for k in single)
    report = inspect_checkpoint(folder, hash=False)
    assert report["loadable"] and report["family"] == family.label and report["layout"] == "diffusers"

    reference = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    assert reference.scheduler.config.prediction_type == prediction and reference.tokenizer.pad_token == "!"
    row = GenerationRow("a blue sphere", negative_prompt="dark", seed=9, steps=4, cfg_scale=7.0, sampler="ddim",
                        width=64, height=96)
    out = ours.generate([row])
    parts = dict(vae=reference.vae.eval(), text_encoder=reference.text_encoder.eval(), tokenizer=reference.tokenizer,
                 unet=reference.unet.eval(), scheduler=reference.scheduler, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    assert_close(f"folder {prediction} ddim 64x96", out, *diffusers_run(parts, row))


def test_sharded_fp16_folder_loads_the_same_tensors(models, tmp_path):
    """fp16 variant files sharded small, so that one layer's q/k/v may sit in different shards: the fused
    in_proj tensors, like every other, equal the single file's (rounded to fp16)."""
    from diffusers import DDIMScheduler

    ref = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in models["epsilon"]["ref"].items()}
    pipe = StableDiffusionPipeline(vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=ref["tokenizer"],
                                   unet=ref["unet"], scheduler=reference_scheduler(DDIMScheduler, "epsilon"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "f", variant="fp16", safe_serialization=True, max_shard_size="1MB")
    assert len(list((tmp_path / "f" / "text_encoder").glob("*.safetensors"))) >= 2
    model, info = load_model(tmp_path / "f", dtype=torch.float32)
    assert info.family == "sd2-eps" and info.dtype == "float16"
    single = models["epsilon"]["ours"].model.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == single.keys()
    assert all(torch.equal(loaded[k], single[k].half().float()) for k in single)


def _copy(path: Path, folder: Path, name: str) -> Path:
    target = folder / name
    try:
        os.link(path, target)
    except OSError:
        shutil.copyfile(path, target)
    return target


def test_single_file_prediction_type_rule(models, tmp_path):
    """An SD 2.x single file alone is ambiguous: a clear error naming both options; a yaml beside it
    with parameterization "v" selects v-prediction, one without selects epsilon; an explicit argument
    wins over the yaml."""
    bare = _copy(models["epsilon"]["path"], tmp_path, "v2-1_unknown.safetensors")
    with pytest.raises(AmbiguousPredictionType, match=r'v2-1_unknown\.safetensors: .*prediction_type="v_prediction"'
                                                      r'.*prediction_type="epsilon".*<checkpoint stem>\.yaml'):
        Pipeline.load(bare, device="cpu", dtype="fp32")
    report = inspect_checkpoint(bare, hash=False)
    assert report["family"].startswith("SD 2.x (prediction type unknown: ") and not report["loadable"]
    assert "prediction_type" in report["error"] and report["config"] == "custom" and not report["missing"]
    assert inspect_checkpoint(bare, hash=False, prediction_type="v_prediction")["family"] == "SD 2.x-v"

    v_file = _copy(models["epsilon"]["path"], tmp_path, "with_v.safetensors")
    write_ldm_yaml(tmp_path / "with_v.yaml", "v_prediction")
    _, info = load_model(v_file)
    assert info.family == "sd2-v" and info.model_family is SD2_V and info.model_family.default_size == 768
    report = inspect_checkpoint(v_file, hash=False)
    assert report["loadable"] and report["family"] == "SD 2.x-v" and report["prediction_type"] == "v_prediction"
    assert report["ignored"] == 12 + 2 + 12   # DDPM buffers, text_projection + logit_scale, the unused block
    _, info = load_model(v_file, prediction_type="epsilon")           # the argument wins
    assert info.model_family is SD2_EPS

    eps_file = _copy(models["epsilon"]["path"], tmp_path, "base.safetensors")
    write_ldm_yaml(tmp_path / "base.yaml", None)
    _, info = load_model(eps_file)
    assert info.model_family is SD2_EPS and info.model_family.default_size == 512
    assert inspect_checkpoint(eps_file, hash=False)["family"] == "SD 2.x-eps"

    for name, text, message in (("empty", "", r"not an LDM model config \(no model: params: mapping\)"),
                                ("cut", "model:\n  base_learning_rate: 1.0e-4\n", "not an LDM model config"),
                                ("tabs", "model:\n\tparams:\n\t\tparameterization: \"v\"\n", "line 2 is indented with a tab")):
        (tmp_path / f"{name}.yaml").write_text(text)          # never read as an epsilon model's config
        with pytest.raises(CheckpointError, match=message):
            load_model(_copy(models["epsilon"]["path"], tmp_path, f"{name}.safetensors"))
    (tmp_path / "odd.yaml").write_text("model:\n  params:\n    parameterization: \"x0\"\n")
    with pytest.raises(CheckpointError, match="parameterization 'x0' is not supported"):
        load_model(_copy(models["epsilon"]["path"], tmp_path, "odd.safetensors"))
    with pytest.raises(CheckpointError, match='"epsilon" or "v_prediction"'):
        load_model(bare, prediction_type="v")
