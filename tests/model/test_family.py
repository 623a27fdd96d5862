"""The model-family seam (batchsd.model.family): SD 1.x and SD 2.x are recognised from released
checkpoints' key sets, and what is neither is refused with a CheckpointError that says what it is."""
from __future__ import annotations

import json

import pytest

from batchsd.errors import CheckpointError
from batchsd.model.checkpoint import infer_config
from batchsd.model.config import SD15, SD21
from batchsd.model.family import (FAMILIES, SD1, SD2_EPS, SD2_V, SDXL, AmbiguousPredictionType, CheckpointHints,
                                  detect_family, resolve_family)
from batchsd.model.stable_diffusion import (ORIGINAL_PREFIX, SD2_PREFIX, UNET_PREFIX, StableDiffusion2Model,
                                            StableDiffusionModel)
from ref_checkpoint import SD15_KEYS

SD21_KEYS = SD15_KEYS.with_name("sd21_keys.json")


@pytest.fixture(scope="module")
def sd15_shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads(SD15_KEYS.read_text()).items()}


@pytest.fixture(scope="module")
def sd21_shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads(SD21_KEYS.read_text()).items()}


def test_sd1_is_registered_with_its_layout():
    assert FAMILIES == {"sd1": SD1, "sd2-eps": SD2_EPS, "sd2-v": SD2_V, "sdxl": SDXL} and SD1.label == "SD 1.x"
    assert SD1.scheduler.prediction_type == "epsilon"
    assert SD1.prefixes is ORIGINAL_PREFIX and SD1.model_class is StableDiffusionModel
    assert SD1.default_size == 512 and SD1.latent_scale(SD15) == SD15.vae.scaling_factor


def test_sd1_detected_from_the_released_key_set(sd15_shapes):
    assert SD1.detect(sd15_shapes)
    assert detect_family(sd15_shapes) is SD1
    assert SD1.infer_config(sd15_shapes) is SD15


def test_no_unet_keys_is_refused(sd15_shapes):
    no_unet = {k: v for k, v in sd15_shapes.items() if not k.startswith(UNET_PREFIX)}
    assert detect_family(no_unet) is SD1            # text encoder present: an SD 1.x file, incomplete
    with pytest.raises(CheckpointError, match=r"no UNet tensors under model\.diffusion_model\.: an SD 1\.x "
                                              r"checkpoint needs the UNet, the VAE and the text encoder"):
        infer_config(no_unet)


def test_sd2_families(sd21_shapes, sd15_shapes):
    for family, prediction, size in ((SD2_EPS, "epsilon", 512), (SD2_V, "v_prediction", 768)):
        assert family.prefixes is SD2_PREFIX and family.model_class is StableDiffusion2Model
        assert family.scheduler.prediction_type == prediction and family.default_size == size
        assert family.detect(sd21_shapes) and not family.detect(sd15_shapes)
    assert not SD1.detect(sd21_shapes)
    assert SD2_EPS.infer_config(sd21_shapes) is SD21      # the released key set: the SD 2.1 preset
    assert SD21.clip.layers == 23 and SD21.unet.heads_at(1280) == 20 and SD21.unet.linear_proj
    # the prediction type is not in the keys: the explicit choice, or an error naming both options
    with pytest.raises(AmbiguousPredictionType, match=r'prediction_type="v_prediction".*prediction_type="epsilon"'
                                                      r'.*\.yaml'):
        resolve_family(sd21_shapes)
    assert resolve_family(sd21_shapes, CheckpointHints(prediction_type="v_prediction"))[0] is SD2_V
    assert resolve_family(sd21_shapes, CheckpointHints(prediction_type="epsilon"))[0] is SD2_EPS
    # explicit argument > yaml > nothing
    yaml_v = CheckpointHints(yaml_path="m.yaml", yaml_prediction_type="v_prediction")
    assert resolve_family(sd21_shapes, yaml_v)[0] is SD2_V
    assert resolve_family(sd21_shapes, CheckpointHints(yaml_path="m.yaml", yaml_prediction_type="v_prediction",
                                                       prediction_type="epsilon"))[0] is SD2_EPS
    with pytest.raises(CheckpointError, match="epsilon.*v_prediction"):
        resolve_family(sd21_shapes, CheckpointHints(prediction_type="v"))
    # SD 1.x needs no choice (epsilon); an explicit v-prediction keeps the family, changes its scheduler
    assert resolve_family(sd15_shapes) == (SD1, SD15)
    v1, _ = resolve_family(sd15_shapes, CheckpointHints(prediction_type="v_prediction"))
    assert v1.name == "sd1" and v1.scheduler.prediction_type == "v_prediction"


def test_other_families_are_named(sd15_shapes):
    unet_only = {k: v for k, v in sd15_shapes.items() if k.startswith(UNET_PREFIX)}
    with pytest.raises(CheckpointError, match="UNet-only"):
        detect_family(unet_only)
    cases = {
        "SDXL": {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
                 UNET_PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3)},
        "SDXL refiner": {"conditioner.embedders.0.model.token_embedding.weight": (49408, 1280),
                         UNET_PREFIX + "label_emb.0.0.weight": (1536, 2560)},
        "Stable Diffusion 3": {UNET_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536),
                               "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (768,)},
        "Flux": {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "img_in.weight": (3072, 64)},
        "LoRA": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1),
                 "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()},
        "textual inversion": {"emb_params": (2, 768)},
        "VAE alone": {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3),
                      "quant_conv.weight": (8, 8, 1, 1)},
    }
    for what, shapes in cases.items():
        with pytest.raises(CheckpointError, match=rf"not a checkpoint batchsd supports: this is an? {what}.*"
                                                  rf"batchsd runs SD 1\.x, SD 2\.x and SDXL base"):
            detect_family(shapes)
    with pytest.raises(CheckpointError, match="textual inversion"):   # an A1111 .pt: no top-level tensors
        detect_family({}, other_names=["string_to_token", "string_to_param", "name", "step"])


@pytest.mark.parametrize("configs, message", [
    ({"vae": {"scaling_factor": 0}}, r"vae/config\.json: scaling_factor 0 must be a number > 0"),
    ({"vae": {"scaling_factor": "0.18"}}, r"scaling_factor '0\.18' must be a number > 0"),
    ({"unet": {"attention_head_dim": 3}}, r"unet/config\.json: 3 attention heads do not divide the 320 channels"),
    ({"unet": {"attention_head_dim": "eight"}}, r"attention heads 'eight' do not fit the 4 levels"),
    ({"unet": {"sample_size": 7}}, r"unet/config\.json: sample_size 7 .* in 64\.\.2048"),
    ({"vae": {"norm_num_groups": 24}}, r"vae/config\.json: norm_num_groups 24 does not divide the channels"),
    ({"unet": {"cross_attention_dim": 1024}}, r"unet/config\.json: cross_attention_dim 1024 disagrees with the "
                                              r"weights \(768\)"),
    ({"vae": {"latent_channels": 16}}, r"vae/config\.json: latent_channels 16 disagrees with the weights"),
    ({"vae": {"block_out_channels": [128, 256, 512, 256]}}, r"block_out_channels \[128, 256, 512, 256\] disagrees"),
    ({"unet": {"norm_num_groups": "32"}}, r"unet/config\.json: norm_num_groups '32' does not divide"),
    ({"unet": {"sample_size": 0}}, r"sample_size 0 "),
    ({"unet": {"sample_size": [64, 96]}}, r"sample_size \[64, 96\] "),
    ({"text_encoder": {"num_attention_heads": 5}}, r"text_encoder/config\.json: num_attention_heads 5 does not "
                                                   r"divide the encoder's width 768"),
    ({"scheduler": {"beta_start": -1.0}}, r"scheduler_config\.json: beta_start -1\.0 and beta_end 0\.012 must "
                                          r"satisfy 0 < beta_start < beta_end < 1"),
    ({"scheduler": {"num_train_timesteps": 0}}, r"num_train_timesteps 0 must be >= 2"),
])
def test_folder_config_values_the_weights_cannot_run_are_refused_at_load(sd15_shapes, configs, message):
    """A diffusers folder's configs are authoritative, so a value that would make black images or fail
    every row later (a zero VAE scale, heads that do not divide the channels) is refused naming the file."""
    with pytest.raises(CheckpointError, match=message):
        resolve_family(sd15_shapes, CheckpointHints(configs=configs))
    assert resolve_family(sd15_shapes, CheckpointHints(configs={"unet": {"sample_size": 96}}))[0].default_size == 768
    _, cfg = resolve_family(sd15_shapes, CheckpointHints(configs={"vae": {"norm_num_groups": 16}}))
    assert cfg.vae.groups == 16                                    # read, not ignored
