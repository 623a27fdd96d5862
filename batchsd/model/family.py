"""Model families: what differs between Stable Diffusion generations, behind one small interface.

A `ModelFamily` says how to recognise a checkpoint of the family, read its configuration, build
the model, turn prompts into the UNet's context, scale latents, and which scheduler values
(prediction type included) and default image size it was trained with. Checkpoint loading
(checkpoint.py) and the Pipeline (pipeline.py) go through the family and nothing else that is
family-specific, so a new family is a new `ModelFamily` and its modules, registered in `FAMILIES`,
without editing the pipeline's flow.

Families:

    sd1      "SD 1.x"      CLIP ViT-L/14 text encoder, the CompVis UNet and VAE, SD 1.5's scheduler
                           config (epsilon), 512x512
    sd2-eps  "SD 2.x-eps"  SD 2.0/2.1-base: OpenCLIP ViT-H/14 text encoder read at its penultimate
                           layer (openclip.py), "!"-padded tokens, UNet with linear projections,
                           64-wide heads and a 1024-wide context; SD 1.5's scheduler values,
                           epsilon prediction, 512x512
    sd2-v    "SD 2.x-v"    SD 2.0/2.1 (768-v): the same model, v-prediction, 768x768
    sdxl     "SDXL"        SDXL base 1.0: CLIP ViT-L and OpenCLIP ViT-bigG read at their penultimate
                           layers (context 768 + 1280), ViT-bigG's pooled projection and the size/crop
                           numbers as the UNet's vector y (`sdxl_vector`), 3-level UNet, VAE scaled by
                           0.13025 and run in fp32 under fp16; SDXL's scheduler config ("leading"
                           timesteps for every sampler), epsilon, 1024x1024; an empty negative prompt
                           is zero conditioning

The two SD 2.x families have the same keys and shapes: the prediction type is not in a single
file. `resolve_family` picks it by this rule (never a silent guess):

    1. the caller's explicit `prediction_type` ("epsilon" | "v_prediction": Pipeline.load,
       load_model, inspect_checkpoint) wins;
    2. else what the checkpoint says: a diffusers folder's scheduler/scheduler_config.json
       `prediction_type` (absent there: epsilon, diffusers' default); beside a single file, an A1111-style `<checkpoint stem>.yaml` (the LDM
       config): `parameterization: "v"` under model.params means v-prediction, a yaml without it
       epsilon;
    3. else the family's own when the keys name one family (SD 1.x: epsilon);
    4. else (an SD 2.x single file without yaml or argument) a CheckpointError naming both options.

A diffusers folder's configs are authoritative over the family's defaults: its scheduler config's
scaled_linear betas, train steps and steps_offset, its UNet's `sample_size` (x 8: the default
image size), and the model config (config_inference.apply_diffusers_configs). An explicit prediction
type that no registered family of those keys has (a v-prediction SD 1.x fine-tune) keeps the family
and changes its scheduler's prediction type.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, NamedTuple

import torch
from torch import nn

from batchsd.errors import CheckpointError
from batchsd.model.config import SDConfig
from batchsd.model.config_inference import infer_sd1_config, infer_sd2_config, infer_sdxl_config
from batchsd.model.request import DEFAULT_SIZE, MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE
from batchsd.model.samplers import PREDICTION_TYPES, SchedulerConfig
from batchsd.model.stable_diffusion import (CLIP_PREFIX, OPENCLIP_PREFIX, ORIGINAL_PREFIX, SD2_PREFIX,
                                            SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX, SDXL_PREFIX, UNET_PREFIX,
                                            VAE_PREFIX, StableDiffusion2Model, StableDiffusionModel,
                                            StableDiffusionXLModel)
from batchsd.model.tokenizer import SD2_PAD_TOKEN, tokenize

Shapes = Mapping[str, tuple[int, ...]]   # checkpoint key (original layout) -> tensor shape

SUPPORTED = "SD 1.x, SD 2.x and SDXL base"   # what messages say batchsd runs


class TextConditioning(NamedTuple):
    """What a family's text encoders make of a batch of prompts."""
    context: torch.Tensor                   # [B, 77, D] the UNet's cross-attention context
    truncated: list[bool]                   # whether each prompt was cut at 77 tokens
    pooled: torch.Tensor | None = None      # [B, P] a pooled text embedding (SDXL), else None


@dataclass(frozen=True)
class CheckpointHints:
    """What a checkpoint says beyond its tensor shapes, and what the caller asks for."""
    layout: str = "single-file"                            # "single-file" | "diffusers"
    configs: Mapping[str, Mapping] = field(default_factory=dict)  # diffusers folder: component -> config.json
    yaml_path: str | None = None                           # the `<stem>.yaml` beside a single file
    yaml_prediction_type: str | None = None                # what it says ("epsilon" | "v_prediction")
    prediction_type: str | None = None                     # the caller's explicit choice (wins)


@dataclass(frozen=True)
class ModelFamily:
    name: str                              # stable identifier ("sd1", "sd2-v")
    label: str                             # what messages show ("SD 1.x", "SD 2.x-v")
    prefixes: Mapping[str, str]            # component ("unet", "vae", "text_encoder") -> checkpoint key prefix
    detect: Callable[[Shapes], bool]       # whether a checkpoint's keys are this family's
    # its configuration (CheckpointError when the shapes do not fit); hints: layout and diffusers configs
    infer_config: Callable[..., SDConfig]
    # model_class(cfg) builds the model (.cfg, .unet, .vae, .text_encoder); .random(cfg, seed): random weights
    model_class: type[nn.Module]
    # text conditioning: (model, prompts, device, skip, embeddings) -> TextConditioning; skip: the text
    # encoder's last layers left out (clip skip - 1; only families with `clip_skip` take skip > 0);
    # embeddings: name -> embeddings.Embedding, the textual inversions the prompts may name
    encode_text: Callable[..., TextConditioning]
    # A1111-syntax chunks: (model, ids [N, 77] padded with <|endoftext|>, device, skip, slots) -> (each
    # text encoder's hidden states [N, 77, D_i], pooled [N, P] or None), before emphasis
    # (text_conditioning.py); slots: each chunk's embedding vectors (embeddings.Slot), or None
    encode_chunks: Callable[..., tuple[list[torch.Tensor], torch.Tensor | None]]
    latent_scale: Callable[[SDConfig], float]  # VAE latents x this = the latents the UNet works on
    scheduler: SchedulerConfig             # the training noise schedule the samplers rebuild (prediction type too)
    default_size: int                      # text-to-image width and height when a row gives none
    # file tensors under its prefixes that the family knows and does not load (key, config) -> bool
    ignored: Callable[[str, SDConfig], bool] = lambda key, cfg: False
    # an empty negative prompt is all-zero conditioning (context and pooled), not the encoding of ""
    # (SDXL: diffusers' force_zeros_for_empty_prompt, A1111's zeroed empty negative prompt)
    zero_empty_negative: bool = False
    clip_skip: bool = False   # whether rows may skip text encoder layers (A1111 applies clip skip to SD 1.x only)
    # the UNet's vector input y (cfg.unet.adm_in_channels) from the pooled text embeddings [B, P], the
    # rows and their (width, height): SDXL's `sdxl_unet_vector`; None: the UNet takes no vector
    unet_vector: Callable[[torch.Tensor, list, int, int], torch.Tensor] | None = None

    @property
    def generation(self) -> str:
        """The label without the prediction type ("SD 2.x" of "SD 2.x-v")."""
        return self.label.split("-")[0]


def _vae_latent_scale(cfg: SDConfig) -> float:
    return cfg.vae.scaling_factor


# ----------------------------------------------------------------------------- SD 1.x

def _sd1_detect(shapes: Shapes) -> bool:
    """An SD 1.x checkpoint has its text encoder, CLIP ViT-L/14, under CLIP_PREFIX (SD 2.x and SDXL
    files keep theirs elsewhere)."""
    return any(k.startswith(CLIP_PREFIX) for k in shapes)


def _sd1_infer_config(shapes: Shapes, hints: CheckpointHints = CheckpointHints()) -> SDConfig:
    return infer_sd1_config(shapes, hints.configs)


def _tokens(prompts: list[str], embeddings: Mapping | None, pad_token: str | None = None):
    """(ids [B, 77], each row's embedding slots or None, truncated): tokenizer.tokenize's reading, with
    the embeddings named in the prompts (embeddings.tokenize_prompts) when there are any."""
    if not embeddings:
        ids, truncated = tokenize(prompts, pad_token=pad_token)
        return ids, None, truncated
    from batchsd.model.embeddings import tokenize_prompts

    return tokenize_prompts(prompts, embeddings, pad_token)


def _token_embeds(encoder: nn.Module, ids: torch.Tensor, slots, table: str | None = None):
    """The `token_embeds` argument for `encoder`: None without embedding slots (its own lookup)."""
    if not slots or not any(slots):
        return None
    from batchsd.model.embeddings import SINGLE, embed_tokens

    return embed_tokens(encoder, ids, slots, table or SINGLE)


def _sd1_encode_text(model: nn.Module, prompts: list[str], device: torch.device, skip: int = 0,
                     embeddings: Mapping | None = None) -> TextConditioning:
    """CLIP token ids (77, padded with <|endoftext|>) -> the text encoder's last hidden state (or,
    skipping `skip` layers, an earlier one through the final norm)."""
    ids, slots, truncated = _tokens(prompts, embeddings)
    (context,), _ = _sd1_encode_chunks(model, ids, device, skip, slots)
    return TextConditioning(context, truncated)


def _sd1_encode_chunks(model: nn.Module, ids: torch.Tensor, device: torch.device, skip: int = 0, slots=None):
    ids = ids.to(device)
    return [model.text_encoder(ids, skip, token_embeds=_token_embeds(model.text_encoder, ids, slots))], None


def pad_after_end(ids: torch.Tensor) -> torch.Tensor:
    """<|endoftext|>-padded ids [N, 77] with every id after the first <|endoftext|> set to 0 ("!"): the
    OpenCLIP encoders' padding (A1111's id_pad for them)."""
    from batchsd.model.tokenizer import EOS_ID

    after = (ids == EOS_ID).int().cumsum(dim=1) > 0
    first = after & ~torch.nn.functional.pad(after[:, :-1], (1, 0))
    return torch.where(after & ~first, torch.zeros_like(ids), ids)


SD15_SCHEDULER = SchedulerConfig(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, steps_offset=1)

SD1 = ModelFamily(
    name="sd1",
    label="SD 1.x",
    prefixes=ORIGINAL_PREFIX,
    detect=_sd1_detect,
    infer_config=_sd1_infer_config,
    model_class=StableDiffusionModel,
    encode_text=_sd1_encode_text,
    encode_chunks=_sd1_encode_chunks,
    clip_skip=True,
    latent_scale=_vae_latent_scale,
    scheduler=SD15_SCHEDULER,
    default_size=DEFAULT_SIZE,
)


# ----------------------------------------------------------------------------- SD 2.x

def _sd2_detect(shapes: Shapes) -> bool:
    """An SD 2.x checkpoint has its text encoder, OpenCLIP ViT-H/14, under `cond_stage_model.model.`
    and a UNet under `model.diffusion_model.` (SDXL keeps its encoders under `conditioner.`)."""
    return (any(k.startswith(OPENCLIP_PREFIX) for k in shapes)
            and not any(k.startswith(CLIP_PREFIX) for k in shapes))


def _sd2_infer_config(shapes: Shapes, hints: CheckpointHints = CheckpointHints()) -> SDConfig:
    return infer_sd2_config(shapes, hints.layout, hints.configs)


def _sd2_encode_text(model: nn.Module, prompts: list[str], device: torch.device, skip: int = 0,
                     embeddings: Mapping | None = None) -> TextConditioning:
    """Token ids (77, padded with "!", id 0, as diffusers' SD 2.x tokenizer) -> ln_final of the OpenCLIP
    encoder's penultimate layer."""
    ids, slots, truncated = _tokens(prompts, embeddings, SD2_PAD_TOKEN)
    ids = ids.to(device)
    return TextConditioning(model.text_encoder(ids, _token_embeds(model.text_encoder, ids, slots)), truncated)


def _sd2_encode_chunks(model: nn.Module, ids: torch.Tensor, device: torch.device, skip: int = 0, slots=None):
    ids = pad_after_end(ids).to(device)
    return [model.text_encoder(ids, _token_embeds(model.text_encoder, ids, slots))], None


# non-model tensors of released SD 2.x files under the text encoder's prefix: CLIP's projection to the
# joint embedding, its logit scale, OpenCLIP's causal mask buffer, and a diffusers folder's position ids
_SD2_TEXT_IGNORED = frozenset(OPENCLIP_PREFIX + k for k in ("text_projection", "logit_scale", "attn_mask",
                                                             "position_ids"))


def _sd2_ignored(key: str, cfg: SDConfig) -> bool:
    """The known tensors SD 2.x does not use: _SD2_TEXT_IGNORED, and the blocks of the text encoder
    after those it runs (the last of ViT-H's 24: SD 2.x reads the penultimate layer)."""
    return key in _SD2_TEXT_IGNORED or _block_index(key, OPENCLIP_PREFIX + "transformer.resblocks.") == cfg.clip.layers


def _block_index(key: str, prefix: str) -> int | None:
    """n of a key `<prefix><n>.<rest>` (a text encoder block's number), else None."""
    if not key.startswith(prefix):
        return None
    index = key[len(prefix):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _sd2_family(name: str, label: str, prediction_type: str, default_size: int) -> ModelFamily:
    return ModelFamily(
        name=name,
        label=label,
        prefixes=SD2_PREFIX,
        detect=_sd2_detect,
        infer_config=_sd2_infer_config,
        model_class=StableDiffusion2Model,
        encode_text=_sd2_encode_text,
        encode_chunks=_sd2_encode_chunks,
        latent_scale=_vae_latent_scale,
        # stabilityai/stable-diffusion-2-1(-base) scheduler_config.json: SD 1.5's betas and steps_offset,
        # no timestep_spacing (each sampler's class default, as for SD 1.x)
        scheduler=replace(SD15_SCHEDULER, prediction_type=prediction_type),
        default_size=default_size,
        ignored=_sd2_ignored,
    )


SD2_EPS = _sd2_family("sd2-eps", "SD 2.x-eps", "epsilon", 512)
SD2_V = _sd2_family("sd2-v", "SD 2.x-v", "v_prediction", 768)

# ----------------------------------------------------------------------------- SDXL

def _sdxl_detect(shapes: Shapes) -> bool:
    """An SDXL base checkpoint has CLIP ViT-L under `conditioner.embedders.0.transformer.` and OpenCLIP
    ViT-bigG under `conditioner.embedders.1.model.` (the refiner has only the latter, as embedders.0)."""
    return (any(k.startswith(SDXL_CLIP_PREFIX) for k in shapes)
            and any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in shapes))


ADD_TIME_EMBED_DIM = 256   # SDXL: each size/crop number's sinusoidal embedding width (addition_time_embed_dim)


def _sdxl_infer_config(shapes: Shapes, hints: CheckpointHints = CheckpointHints()) -> SDConfig:
    unet = hints.configs.get("unet", {})
    for key, want in (("addition_embed_type", "text_time"), ("addition_time_embed_dim", ADD_TIME_EMBED_DIM)):
        if key in unet and unet[key] != want:
            raise CheckpointError(f"unet/config.json: {key} {unet[key]!r} is not supported (SDXL base: {want!r})")
    cfg = infer_sdxl_config(shapes, hints.configs)
    want = cfg.clip2.projection_dim + 6 * ADD_TIME_EMBED_DIM
    if cfg.unet.adm_in_channels != want:
        raise CheckpointError(f"the UNet's size/crop conditioning takes {cfg.unet.adm_in_channels} values, not "
                              f"{want} (pooled text {cfg.clip2.projection_dim} + 6 x {ADD_TIME_EMBED_DIM}): "
                              f"not an SDXL base model (the refiner takes 2560)")
    return cfg


def _sdxl_encode_text(model: nn.Module, prompts: list[str], device: torch.device, skip: int = 0,
                      embeddings: Mapping | None = None) -> TextConditioning:
    """CLIP ViT-L's penultimate hidden state (tokens padded with <|endoftext|>) and OpenCLIP ViT-bigG's
    (tokens padded with "!", id 0, as diffusers' tokenizer_2), concatenated to the context [B, 77, 768 +
    1280]; ViT-bigG's pooled projection as `pooled`."""
    ids, slots, truncated = _tokens(prompts, embeddings)
    ids_2, slots_2, _ = _tokens(prompts, embeddings, SD2_PAD_TOKEN)   # the same BPE: the same cuts
    ids, ids_2 = ids.to(device), ids_2.to(device)
    first = model.text_encoder(ids, token_embeds=_token_embeds(model.text_encoder, ids, slots, "clip_l"))
    second, pooled = model.text_encoder_2.forward_with_pooled(
        ids_2, _token_embeds(model.text_encoder_2, ids_2, slots_2, "clip_g"))
    return TextConditioning(torch.cat([first, second], dim=-1), truncated, pooled)


def _sdxl_encode_chunks(model: nn.Module, ids: torch.Tensor, device: torch.device, skip: int = 0, slots=None):
    ids, ids_2 = ids.to(device), pad_after_end(ids).to(device)
    second, pooled = model.text_encoder_2.forward_with_pooled(
        ids_2, _token_embeds(model.text_encoder_2, ids_2, slots, "clip_g"))
    return [model.text_encoder(ids, token_embeds=_token_embeds(model.text_encoder, ids, slots, "clip_l")), second], pooled


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> list[float]:
    """SDXL's six micro-conditioning numbers, in diffusers' add_time_ids order: original (height, width),
    crop (top, left), target (height, width)."""
    return [float(v) for v in (*original_size, *crop_top_left, *target_size)]


def sdxl_vector(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """The UNet's y [B, P + 6 * 256]: the pooled text embedding, then the sinusoidal embedding of each
    micro-conditioning number (time_ids [B, 6], float32), as sgm's ConcatTimestepEmbedderND and
    diffusers' add_time_proj + add_embeds."""
    from batchsd.model.unet import timestep_embedding

    B = time_ids.shape[0]
    times = timestep_embedding(time_ids.flatten(), ADD_TIME_EMBED_DIM).reshape(B, -1)   # [B, 6 * 256] float32
    return torch.cat([pooled.float(), times.to(pooled.device)], dim=-1)


def sdxl_unet_vector(pooled: torch.Tensor, rows: list, width: int, height: int) -> torch.Tensor:
    """y for each row: its pooled text embedding and its size/crop numbers (GenerationRow's
    original_width/height, default the row's size; crop_top/left, default 0), the target size being
    the row's (width, height)."""
    ids = [sdxl_time_ids((r.original_height or height, r.original_width or width),
                         (r.crop_top or 0, r.crop_left or 0), (height, width)) for r in rows]
    return sdxl_vector(pooled, torch.tensor(ids, dtype=torch.float32))


# non-model tensors of SDXL files under the text encoders' prefixes: position ids, ViT-bigG's logit
# scale and causal mask buffer
_SDXL_TEXT_IGNORED = frozenset([SDXL_CLIP_PREFIX + "embeddings.position_ids", SDXL_OPENCLIP_PREFIX + "logit_scale",
                                SDXL_OPENCLIP_PREFIX + "attn_mask", SDXL_OPENCLIP_PREFIX + "position_ids"])


def _sdxl_ignored(key: str, cfg: SDConfig) -> bool:
    """_SDXL_TEXT_IGNORED, and what CLIP ViT-L has after the penultimate layer SDXL reads: its last block
    and final_layer_norm."""
    return (key in _SDXL_TEXT_IGNORED or key.startswith(SDXL_CLIP_PREFIX + "final_layer_norm.")
            or _block_index(key, SDXL_CLIP_PREFIX + "encoder.layers.") == cfg.clip.layers)


SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    prefixes=SDXL_PREFIX,
    detect=_sdxl_detect,
    infer_config=_sdxl_infer_config,
    model_class=StableDiffusionXLModel,
    encode_text=_sdxl_encode_text,
    encode_chunks=_sdxl_encode_chunks,
    latent_scale=_vae_latent_scale,
    # stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json: SD 1.5's betas and steps_offset,
    # timestep_spacing "leading" for every sampler (SD 1.x/2.x leave each sampler's class default)
    scheduler=replace(SD15_SCHEDULER, timestep_spacing="leading"),
    default_size=1024,
    ignored=_sdxl_ignored,
    zero_empty_negative=True,
    unet_vector=sdxl_unet_vector,
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SD2_EPS, SD2_V, SDXL)}


# ----------------------------------------------------------------------------- detection and resolution

def _unsupported_hint(keys: Iterable[str]) -> str:
    """What a checkpoint that no family detects looks like: "this is X" (or "")."""
    keys = list(keys)

    def any_start(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    def any_has(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    if any_start("conditioner.embedders.0.model."):
        return "this is an SDXL refiner (batchsd runs the SDXL base model)"
    if any_start("conditioner.embedders."):
        return "this is an SDXL checkpoint without both of SDXL base's text encoders"
    if any_has("joint_blocks.") or any_start("text_encoders."):
        return "this is a Stable Diffusion 3 checkpoint"
    if any_has("double_blocks.", "single_blocks.") or any_start("img_in.", "time_in."):
        return "this is a Flux checkpoint"
    if any_start("lora_unet_", "lora_te") or any_has(".lora_down.", ".lora_up.", ".lora_A.", ".lora_B."):
        return "this is a LoRA, not a full model: batchsd loads full checkpoints"
    if any_start("string_to_param", "emb_params", "clip_l", "clip_g") and len(keys) <= 4:
        return "this is a textual inversion embedding, not a model"
    if keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE_PREFIX))
                    for k in keys):
        return "this is a VAE alone, not a full model"
    if any_start(UNET_PREFIX):
        return "a UNet-only file? batchsd needs the full model: UNet, VAE and text encoder"
    return ""


def detect_family(shapes: Shapes, other_names: Iterable[str] = ()) -> ModelFamily:
    """The first family whose checkpoints have these keys (for SD 2.x: SD2_EPS; `resolve_family`
    picks the prediction type); CheckpointError saying what the file looks like when none does.
    `other_names`: the file's non-tensor entries (a textual inversion .pt has only those)."""
    for family in FAMILIES.values():
        if family.detect(shapes):
            return family
    hint = _unsupported_hint([*shapes, *other_names])
    prefixes = ", ".join(dict.fromkeys(f.prefixes["text_encoder"] for f in FAMILIES.values()))
    what = f"{hint}; " if hint else ""
    raise CheckpointError(f"not a checkpoint batchsd supports: {what}batchsd runs {SUPPORTED} "
                          f"(no text encoder tensors under {prefixes})")


def check_prediction_type(value: str | None) -> str | None:
    if value is not None and value not in PREDICTION_TYPES:
        raise CheckpointError(f"prediction_type must be \"epsilon\" or \"v_prediction\", got {value!r}")
    return value


class AmbiguousPredictionType(CheckpointError):
    """An SD 2.x single file whose prediction type nothing says (`resolve_family`'s rule 4); `family`
    (the first candidate) and `cfg` are what its shapes say."""

    def __init__(self, message: str, family: "ModelFamily | None" = None, cfg: SDConfig | None = None):
        super().__init__(message)
        self.family, self.cfg = family, cfg


def _stated_prediction_type(hints: CheckpointHints) -> str | None:
    """The prediction type by rules 1-2, or None."""
    if hints.prediction_type is not None:
        return check_prediction_type(hints.prediction_type)
    if "scheduler" in hints.configs:   # diffusers' scheduler classes default to epsilon
        value = hints.configs["scheduler"].get("prediction_type", "epsilon")
        if value not in PREDICTION_TYPES:
            raise CheckpointError(f"scheduler/scheduler_config.json: prediction_type {value!r} is not supported "
                                  f"(\"epsilon\" or \"v_prediction\")")
        return value
    return hints.yaml_prediction_type


def _folder_scheduler(config: Mapping, base: SchedulerConfig) -> SchedulerConfig:
    """A diffusers scheduler_config.json's schedule values over `base` (its prediction type is set by
    the caller)."""
    if config.get("beta_schedule", "scaled_linear") != "scaled_linear" or config.get("trained_betas"):
        raise CheckpointError(f"scheduler/scheduler_config.json: beta_schedule {config.get('beta_schedule')!r}"
                              f"{' with trained_betas' if config.get('trained_betas') else ''} is not supported "
                              f"(scaled_linear)")
    # options that change every sampler's images and that batchsd's samplers do not have: refused, not ignored
    unsupported = [key for key in ("rescale_betas_zero_snr", "thresholding", "clip_sample", "set_alpha_to_one")
                   if config.get(key) is True]
    if unsupported:
        raise CheckpointError(f"scheduler/scheduler_config.json: {', '.join(k + ' true' for k in unsupported)} is not "
                              "supported (batchsd's samplers run with it false, as the SD 1.x, 2.x and SDXL configs "
                              "have it)")
    try:   # SchedulerConfig checks the values it takes (a timestep_spacing the samplers do not have)
        return replace(base, num_train_timesteps=int(config.get("num_train_timesteps", base.num_train_timesteps)),
                       beta_start=float(config.get("beta_start", base.beta_start)),
                       beta_end=float(config.get("beta_end", base.beta_end)),
                       steps_offset=int(config.get("steps_offset", base.steps_offset)),
                       timestep_spacing=config.get("timestep_spacing", base.timestep_spacing))
    except ValueError as e:
        raise CheckpointError(f"scheduler/scheduler_config.json: {e}") from None


def resolve_family(shapes: Shapes, hints: CheckpointHints = CheckpointHints(),
                   other_names: Iterable[str] = ()) -> tuple[ModelFamily, SDConfig]:
    """The family (prediction type and default size settled by the rule in this module's docstring)
    and configuration of a checkpoint. CheckpointError when no family fits, when its shapes do not fit
    its family (the config is inferred before the prediction type is asked for), and
    AmbiguousPredictionType when an SD 2.x single file does not say its prediction type."""
    first = detect_family(shapes, other_names)
    candidates = [f for f in FAMILIES.values() if f.detect(shapes)]
    cfg = first.infer_config(shapes, hints)
    prediction_type = _stated_prediction_type(hints)
    if prediction_type is None:
        # (a variant UNet, e.g. 9-channel inpainting, is refused by the key check whatever its prediction type)
        if len(candidates) > 1 and cfg.unet.in_channels == cfg.vae.latent_channels:
            options = " or ".join(f"{f.label} ({f.scheduler.prediction_type})" for f in candidates)
            raise AmbiguousPredictionType(
                f"an {first.generation} checkpoint does not say its prediction type ({options}: the file "
                f"alone cannot tell): pass prediction_type=\"v_prediction\" (`batchsd run --prediction-type "
                f"v_prediction`; 768-v models such as "
                f"v2-1_768-ema-pruned) or prediction_type=\"epsilon\" (512 base models such as "
                f"v2-1_512-ema-pruned), or put the model's LDM config beside it as <checkpoint stem>.yaml "
                f"(parameterization: \"v\" under model.params means v-prediction)", first, cfg)
        family = first
    else:
        matching = [f for f in candidates if f.scheduler.prediction_type == prediction_type]
        family = matching[0] if matching else replace(
            first, scheduler=replace(first.scheduler, prediction_type=prediction_type))
    if scheduler := hints.configs.get("scheduler"):
        family = replace(family, scheduler=_folder_scheduler(scheduler, family.scheduler))
    unet_config = hints.configs.get("unet", {})
    if "sample_size" in unet_config:
        sample_size = unet_config["sample_size"]
        size = sample_size * cfg.latent_factor if type(sample_size) is int else None
        if size is None or not (MIN_SIZE <= size <= MAX_SIZE and size % SIZE_MULTIPLE == 0):
            raise CheckpointError(f"unet/config.json: sample_size {sample_size!r} (latent pixels: the default image "
                                  f"size / {cfg.latent_factor}) must be one whole number giving a size that is a "
                                  f"multiple of {SIZE_MULTIPLE} in {MIN_SIZE}..{MAX_SIZE} (SD 1.x: 64, SDXL: 128)")
        family = replace(family, default_size=size)
    return family, cfg
