"""Text-to-image and image-to-image over a batch of rows, with classifier-free guidance.

`Pipeline.generate(rows)` follows diffusers' StableDiffusion(Img2Img)Pipeline step for step, so
that a row's image equals diffusers' output at batch 1 with
`generator=torch.Generator("cpu").manual_seed(seed)` (the seeding contract, README):

    1. check the rows (request.check_row; one batch key, request.batch_key)
    2. encode the text (the model family's text conditioning): each distinct prompt and negative
       prompt once (cached across batches)
    3. initial latents, per row from that row's own CPU generator, in float32:
       text-to-image: randn(1, 4, H/8, W/8) * the sampler's initial sigma
       image-to-image: VAE posterior sample, x the family's latent scale, then forward-process noise
    4. denoise with the sampler over one UNet forward per step for the whole batch: rows with
       cfg_scale != 1 run their unconditional half in the same forward, rows with 1 need none;
       guidance combines the UNet outputs (noise, or velocity for v-prediction models) as diffusers
       does, and the sampler reads them by the family's prediction type
    5. decode latents / latent scale with the VAE, in chunks (one image at a time on the CPU)
    6. to 8-bit RGB images

What differs between model generations (text conditioning, latent scale, scheduler values and
prediction type, default size) comes from `self.family` (family.py, as resolved for the loaded
checkpoint); the flow above is the same for every family (SD 1.x, SD 2.x-eps, SD 2.x-v).
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from batchsd.errors import InputError
from batchsd.model import samplers
from batchsd.model.config import TINY, TINY_MODEL, TINY_MODEL_NAME
from batchsd.model.devices import (cpu_kind, default_attention, default_fused_epilogues, default_low_memory,
                                  default_winograd, resolve_device, resolve_dtype)
from batchsd.model.family import SD1, ModelFamily, TextConditioning, check_prediction_type
from batchsd.model.fast.compiled_unet import CompiledUNet
from batchsd.model.fast.context_projections import reuse_context_projections
from batchsd.model.fast.exact import (exact_numerics, mkl_strict, resolve_exact, rowwise_guided_eps,
                                      warn_unless_mkl_strict)
from batchsd.model.fast.host_copy import host_array, to_host
from batchsd.model.fast.fused_attention import KernelUnavailable, use_fused_attention
from batchsd.model.fast import fused_epilogues as epilogues
from batchsd.model.fast.packed_conv import pack_convolutions, pack_now
from batchsd.model.hash_cache import stamp
from batchsd.model.init_pixels import rgb_pixels
from batchsd.model.fast.winograd import use_winograd_in_model
from batchsd.model.residency import AllHeld, CpuReread, GpuOffload, is_released
from batchsd.model.request import SIZE_CONDITIONING, GenerationRow, check_row, plain_numbers, row_batch_key
from batchsd.model.text_conditioning import EncodedPrompt, clip_skip_layers, encode_prompts, pad_to_chunks
from batchsd.model.tokenizer import preload_tokenizer

log = logging.getLogger(__name__)

TEXT_CACHE_SIZE = 256
ENCODE_AHEAD = TEXT_CACHE_SIZE // 2   # texts Pipeline.encode_ahead encodes at most, well within the cache
# images per VAE call (decode, and encode for image-to-image). On the CPU one at a time: a larger
# chunk's activations outgrow the caches, so it is no faster, and the process peak grows with the
# chunk (figures: docs/performance.md). On CUDA, 4 keeps the GPU busy.
CPU_VAE_CHUNK = 1
CUDA_VAE_CHUNK = 4


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    latents: torch.Tensor                                   # float32, cpu, [B, 4, H/8, W/8], before VAE decode
    prompt_truncated: list[bool] = field(default_factory=list)  # prompt or negative prompt cut at 77 tokens


class Pipeline:
    """A loaded model on a device, ready to generate batches of rows."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, *,
                 name: str, sha256: str | None = None, low_memory: bool = False, vae_chunk: int | None = None,
                 channels_last: bool = True, compile: str | None = None, pack_weights: bool = True,
                 winograd: bool | None = None, family: ModelFamily = SD1, exact: bool | None = None,
                 fused_attention: bool | None = None, fused_epilogues: bool | None = None,
                 source: tuple[Path, str] | None = None):
        self.model = model.eval().requires_grad_(False)   # family.model_class: .cfg, .unet, .vae, .text_encoder
        self.family = family
        self.cfg = model.cfg
        self.latent_scale = family.latent_scale(self.cfg)
        self.device = device
        self.dtype = dtype
        self.name = name
        self.sha256 = sha256
        self.short_hash = sha256[:10] if sha256 else None
        # low memory: on CUDA idle parts wait in CPU memory; on the CPU the text encoders and the UNet are
        # never held together, a freed one read again from `source` (checkpoint path, files stamp):
        # residency.py. `low_memory_cpu` is decided by Pipeline.load, which then leaves the UNet unread.
        self.low_memory = low_memory and device.type == "cuda"
        self.low_memory_cpu = low_memory and device.type == "cpu" and source is not None
        # exact mode (fast/exact.py): a row's bits depend on the row alone, not on its batch or the
        # thread count; None = the device's default (exact.default_exact: on for the CPU), off where
        # a VAE chunk other than 1 is asked for (exact mode decodes one image per call)
        chunked = vae_chunk not in (None, 1)
        self.exact = resolve_exact(False if exact is None and chunked else exact, device.type, compile)
        if self.exact and chunked:
            raise InputError(f"exact mode decodes one image per VAE call: vae_chunk={vae_chunk} needs exact=False")
        # MKL's strict reproducible mode (fast/exact.py), recorded on the CPU; exact mode warns without it
        self.mkl_strict = None if device.type != "cpu" else warn_unless_mkl_strict(log) if self.exact else mkl_strict()
        if vae_chunk is None:
            vae_chunk = 1 if self.exact else CUDA_VAE_CHUNK if device.type == "cuda" else CPU_VAE_CHUNK
        self.vae_chunk = vae_chunk
        # channels_last (NHWC) convolutions and GroupNorms are the fast oneDNN/cuDNN paths (figures:
        # docs/performance.md). Same arithmetic, other summation order: parity tests run with it on.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._text_cache: OrderedDict[tuple, EncodedPrompt] = OrderedDict()   # _encode_text's keys -> states
        self.loras: tuple[tuple[str, float], ...] = ()   # the adapter set applied now (_use_loras)
        self._applied_loras = None
        self._lora_signature: str | None = None   # file_signatures of self.loras' files when applied
        self.model.to(dtype=dtype, memory_format=self.memory_format)
        # a VAE that overflows in fp16 (cfg.vae.force_upcast, SDXL's) runs in fp32 under fp16, as
        # diffusers upcasts it (its fp16-rounded weights, converted)
        self.vae_dtype = torch.float32 if dtype == torch.float16 and self.cfg.vae.force_upcast else dtype
        self.model.vae.to(dtype=self.vae_dtype)
        if not self.low_memory_cpu:          # (then the model is on the CPU, its UNet on meta until used)
            self.model.to(torch.device("cpu") if self.low_memory else device)
        # CPU, not under torch.compile (whose graphs take the plain modules): the wide 3x3 convs by
        # Winograd F(2x2,3x3) (fast/winograd.py), faster but with 16/9 of their weights more memory:
        # None (auto) = devices.default_winograd, keyed on the CPU's kind (off with AMX, off for fp32,
        # whose weights are twice as large); the other convolution weights reordered once for oneDNN,
        # not on every call (packed_conv.PackedConv2d)
        self.cpu_kind = cpu_kind() if device.type == "cpu" else None
        self.winograd = False
        self.pack_weights = pack_weights and device.type == "cpu" and not compile   # (and at each UNet read)
        if self.pack_weights:
            if winograd or (winograd is None and default_winograd(device, dtype, self.cpu_kind)):
                self.winograd = use_winograd_in_model(self.model) > 0
            pack_convolutions(self.model.unet)
            pack_convolutions(self.model.vae)
            # packed, and the Winograd weights transformed, at load, not at the first call: fewer fresh
            # pages (packed_conv.pack_now); the VAE encoder, which only image-to-image rows call, still at
            # its first call
            pack_now(*[m for m in (self.model.unet, self.model.vae.decoder) if not is_released(m)])
        # the UNet's attention by the fused bf16 kernel (fast/fused_attention.py): None (auto) =
        # devices.default_attention, keyed on the CPU's kind; a kernel that cannot be built under auto
        # leaves torch's attention, with a warning and recorded (self.fused_attention False)
        self.fused_attention = self._use_fused_attention(fused_attention, device, dtype, compile)
        # the transformers' GEGLU and residual adds in oneDNN linears' epilogues (fast/fused_epilogues.py):
        # None (auto) = devices.default_fused_epilogues (bf16 with AMX)
        self.fused_epilogues = self._use_fused_epilogues(fused_epilogues, device, dtype, compile, pack_weights)
        # the UNet forward as called by the sampler: eager, or torch.compile'd (compiled_unet.CompiledUNet)
        self.unet = CompiledUNet(self.model.unet, compile, device) if compile else self.model.unet
        self.compiled = bool(compile)
        # the family's text encoders (SDXL has two), held or freed together (residency.py)
        self.text_encoders = torch.nn.ModuleList(
            [m for m in (self.model.text_encoder, getattr(self.model, "text_encoder_2", None)) if m is not None])
        self.residency = (GpuOffload(device) if self.low_memory else
                          CpuReread(self.model, *source, dtype, self.memory_format, self.text_encoders,
                                    self.model.unet, self._after_unet_read) if self.low_memory_cpu else AllHeld())

    def _after_unet_read(self, unet: torch.nn.Module) -> None:
        """The UNet read again (residency.CpuReread): its convolutions packed now, as at load."""
        if self.pack_weights:
            pack_now(unet)

    def _use_fused_epilogues(self, asked: bool | None, device: torch.device, dtype: torch.dtype,
                             compile: str | None, pack_weights: bool = True) -> bool:
        if asked and (device.type != "cpu" or dtype != torch.bfloat16 or compile or not epilogues.available()):
            raise InputError("the fused linear epilogues run bf16 on the CPU (with oneDNN), not under --compile: "
                             "use --dtype bf16 --device cpu, or --epilogues auto")
        if asked is None:
            asked = pack_weights and not compile and default_fused_epilogues(device, dtype, self.cpu_kind) \
                and epilogues.available()
        if asked:
            epilogues.use_fused_epilogues(self.model.unet)
        return bool(asked)

    def _use_fused_attention(self, asked: bool | None, device: torch.device, dtype: torch.dtype,
                             compile: str | None) -> bool:
        if asked is False or (asked is None and (compile or not default_attention(device, dtype, self.cpu_kind))):
            return False
        if asked and (device.type != "cpu" or dtype != torch.bfloat16 or compile):
            raise InputError("the fused attention kernel runs bf16 on the CPU, not under --compile: "
                             "use --dtype bf16 --device cpu, or --attention auto")
        try:
            use_fused_attention(self.model.unet)
        except KernelUnavailable as e:
            if asked:
                raise InputError(f"--attention fused: {e}") from None
            log.warning("fused attention unavailable, using torch's: %s", e)
            return False
        return True

    @classmethod
    def load(cls, model: str | Path, device: str = "auto", dtype: str = "auto",
             low_memory: bool | None = False, compile: str | None = None, winograd: bool | None = None,
             prediction_type: str | None = None, exact: bool | None = None,
             fused_attention: bool | None = None, fused_epilogues: bool | None = None) -> "Pipeline":
        """`model`: "tiny" (deterministic random SD 1.x TINY preset, no file) or a checkpoint path
        (single-file .safetensors/.ckpt or a diffusers folder) of a family in family.FAMILIES.
        `low_memory`: True/False, or None for devices.default_low_memory (on for the CPU): on the CPU the
        text encoders and the UNet held in turn (residency.CpuReread; call `encode_ahead` with the rows
        to come, or each generate call with new prompts reads the UNet again), on CUDA idle parts in
        CPU memory.
        `prediction_type`: "epsilon" | "v_prediction" | None: what the UNet predicts, when the checkpoint
        does not say it (an SD 2.x single file without its `<stem>.yaml`) or to override what it says
        (the rule: family.py).
        `compile`: None (eager) or a torch.compile mode for the UNet (compiled_unet.COMPILE_MODES;
        "reduce-overhead" = CUDA graphs).
        `winograd` (CPU): True/False, or None for the default (devices.default_winograd: on for
        bf16/fp16 on CPUs without AMX, else off).
        `exact`: exact mode (fast/exact.py) on/off, or None for the default (on for the CPU unless
        compiled, off on CUDA).
        `fused_attention` (CPU, bf16): True/False, or None for the default (devices.default_attention:
        on for bf16 on CPUs with avx512-bf16, the tile kernel where they have AMX).
        `fused_epilogues` (CPU, bf16): the transformers' GEGLU and residual adds in oneDNN linears' epilogues:
        True/False, or None for the default (devices.default_fused_epilogues: on for bf16 with AMX)."""
        preload_tokenizer()          # importing transformers overlaps with building the model and the load
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if low_memory is None:
            low_memory = default_low_memory(dev)
        exact = resolve_exact(exact, dev.type, compile)     # its InputError before the weights are read
        if str(model) == TINY_MODEL:
            family = SD1 if prediction_type is None else replace(
                SD1, scheduler=replace(SD1.scheduler, prediction_type=check_prediction_type(prediction_type)))
            return cls(SD1.model_class.random(TINY, seed=0), dev, dt, name=TINY_MODEL_NAME,
                       low_memory=low_memory, compile=compile, winograd=winograd, family=family, exact=exact,
                       fused_attention=fused_attention, fused_epilogues=fused_epilogues)
        from batchsd.model.checkpoint import load_model

        # convolution weights land in channels_last, the layout Pipeline keeps them in (no second copy)
        # low memory on the CPU: the UNet is read at its first use, once the first prompts are encoded
        reread = low_memory and dev.type == "cpu"
        if reread and compile:
            raise InputError("--low-memory on the CPU reads the UNet again while the job runs, which --compile's "
                             "graphs do not follow: drop one of them")
        sd_model, info = load_model(model, device="cpu" if low_memory else dev, dtype=dt,
                                    memory_format=torch.channels_last, prediction_type=prediction_type,
                                    defer=("unet",) if reread else ())
        return cls(sd_model, dev, dt, name=Path(model).stem if Path(model).is_file() else Path(model).name,
                   sha256=info.sha256, low_memory=low_memory, compile=compile, winograd=winograd,
                   family=info.model_family, exact=exact, fused_attention=fused_attention,
                   fused_epilogues=fused_epilogues, source=(info.path, info.files_stamp) if reread else None)

    @staticmethod
    def batch_key(row: GenerationRow) -> tuple:
        """Rows with equal keys can share UNet forwards (one generate call): request.batch_key, with
        unsized text-to-image rows at request.DEFAULT_SIZE (SD 1.x's default size; a model whose family
        has another default, SD 2.x-v's 768, makes such rows at that size, see `default_size`)."""
        return row_batch_key(row)

    @property
    def default_size(self) -> int:
        """Width and height of text-to-image rows that give none (the family's, e.g. 768 for SD 2.x-v)."""
        return self.family.default_size

    # ---------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(self, rows: Sequence[GenerationRow]) -> GenerationOutput:
        # 1. check inputs
        if isinstance(rows, GenerationRow) or not isinstance(rows, Sequence):
            raise InputError(f"generate() takes a list of GenerationRow, not {type(rows).__name__}: generate([row])")
        rows = list(rows)
        if not rows:
            raise InputError("generate() needs at least one row")
        for i, row in enumerate(rows):
            check_row(row, i)
            rows[i] = row = plain_numbers(row)
            given = [name for name in SIZE_CONDITIONING if getattr(row, name) is not None]
            if given and self.family.unet_vector is None:
                raise InputError(f"row {i}, {given[0]}: size/crop conditioning is SDXL's; this {self.family.label} "
                                 f"model does not take it: leave {', '.join(given)} empty")
        keys = {row_batch_key(r, self.family.default_size) for r in rows}
        if len(keys) > 1:
            raise InputError(f"rows in one generate() call must share size, steps, sampler, img2img steps, text "
                             "chunks (A1111 syntax) and LoRA set; "
                             f"got {sorted(keys, key=str)}: split them with Pipeline.batch_key")
        width, height, steps, sampler, img2img_steps, chunks, loras = keys.pop()
        self._use_loras(loras)
        factor = self.cfg.latent_factor
        latent_shape = (1, self.cfg.unet.in_channels, height // factor, width // factor)
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in rows]
        schedule = samplers.make_schedule(sampler, steps, self.family.scheduler)

        # 2. text: [B, 77 * chunks, D] conditional and unconditional states (+ the UNet's vector y, SDXL's)
        cond = self._encode_text(rows, chunks)
        uncond = self._encode_text(rows, chunks, negative=True)
        y_cond = y_uncond = None
        if self.family.unet_vector is not None:
            y_cond = self.family.unet_vector(cond.pooled, rows, width, height).to(self.device)
            y_uncond = self.family.unet_vector(uncond.pooled, rows, width, height).to(self.device)

        # 3. initial latents, float32, one generator per row
        if img2img_steps is None:
            start = 0
            noise = torch.cat([torch.randn(latent_shape, generator=g, dtype=torch.float32) for g in generators])
            latents = noise.to(self.device) * schedule.init_noise_sigma
        else:
            start = steps - img2img_steps
            clean = self._encode_images(rows, width, height, generators)
            noise = torch.cat([torch.randn(latent_shape, generator=g, dtype=torch.float32) for g in generators])
            latents = samplers.add_noise(schedule, clean, noise.to(self.device), start)

        # 4. denoise
        eps_model = self._guided_eps_model(cond.context, uncond.context, [float(r.cfg_scale) for r in rows],
                                           y_cond, y_uncond)
        with self._on_device(self.model.unet), self._context_projections():
            latents = samplers.sample(sampler, eps_model, latents, schedule, generators, start=start)

        # 5-6. decode and convert
        images = self._decode(latents)
        return GenerationOutput(images=images, latents=latents.float().cpu(),
                                prompt_truncated=[a or b for a, b in zip(cond.truncated, uncond.truncated)])

    # ---------------------------------------------------------------- stages
    def _encode_text(self, rows: list[GenerationRow], chunks: int, negative: bool = False) -> TextConditioning:
        """The rows' prompts (or negative prompts) under each row's prompt syntax and clip skip, padded to
        `chunks` x 77 tokens (text_conditioning.py), with the textual-inversion embeddings each row gives.
        Each distinct (text, syntax, skip, embedding files) is encoded once; results are kept in a small
        LRU cache. An empty negative prompt is zeros where the family says so (family.zero_empty_negative)."""
        zero = negative and self.family.zero_empty_negative
        try:
            skips = [clip_skip_layers(self.family, r.clip_skip) for r in rows]
        except ValueError as e:
            raise InputError(f"clip_skip: {e}") from None
        signatures: dict = {}
        keys = [self._text_key(r, skip, signatures, negative) for r, skip in zip(rows, skips)]
        fillers = [self._text_key(r, skip, signatures, filler=True) for r, skip in zip(rows, skips)]  # pads chunks
        needed = keys + (fillers if chunks > 1 else [])
        self._encode_missing(needed, rows)
        for key in needed:
            self._text_cache.move_to_end(key)
        entries = [self._text_cache[k] for k in keys]
        padded = []
        for (text, *_), entry, filler in zip(keys, entries, fillers):
            context = torch.zeros_like(entry.context) if zero and text == "" else entry.context
            fill = self._text_cache[filler].context if chunks > 1 else None
            padded.append(context if fill is None else
                          pad_to_chunks(context, chunks, torch.zeros_like(fill) if zero and text == "" else fill))
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        pooled = None
        if entries[0].pooled is not None:
            pooled = torch.stack([torch.zeros_like(e.pooled) if zero and k[0] == "" else e.pooled
                                  for k, e in zip(keys, entries)])
        return TextConditioning(torch.stack(padded), [e.truncated for e in entries], pooled)

    @staticmethod
    def _text_key(row: GenerationRow, skip: int, signatures: dict, negative: bool = False,
                  filler: bool = False) -> tuple:
        """The text cache's key of a row's prompt (negative prompt; the empty text that pads its chunks):
        (text, syntax, skip, embedding files, their file signatures). A file replaced at its path is read
        again (embeddings.load_embedding checks the same signature). `signatures`: the caller's
        files -> file_signatures, so each set of files is looked at once per call."""
        files = () if filler else row.embeddings
        if files not in signatures:
            signatures[files] = file_signatures(files)
        text = "" if filler else row.negative_prompt if negative else row.prompt
        return text, row.prompt_syntax, skip, files, signatures[files]

    def _encode_missing(self, keys: list[tuple], rows: list[GenerationRow], skip_bad: bool = False) -> None:
        """Encode the `keys` (_text_key) the cache lacks into it. `skip_bad`: a group whose embedding
        files or prompts raise InputError is left out (encode_ahead; its own batch reports it)."""
        missing = list(dict.fromkeys(k for k in keys if k not in self._text_cache))
        # exact mode: each prompt alone (batch 1), so its states do not depend on the prompts it met
        groups: dict[tuple, list[str]] = {}
        for text, syntax, skip, files, signature in missing:
            groups.setdefault((syntax, skip, files, signature), []).append(text)
        for (syntax, skip, files, signature), texts in groups.items():
            try:
                embeddings = self._embeddings(files, rows)
                for group in ([[t] for t in texts] if self.exact else [texts]):
                    with self._on_device(self.text_encoders), exact_numerics(self.exact, self.device):
                        encoded = encode_prompts(self.family, self.model, group, self.device, syntax, skip,
                                                 embeddings)
                    for text, entry in zip(group, encoded):
                        self._text_cache[(text, syntax, skip, files, signature)] = entry
            except InputError:
                if not skip_bad:
                    raise

    @torch.inference_mode()
    def encode_ahead(self, rows: Iterable[GenerationRow], now: int) -> int:
        """Encode into the text cache the texts of the rows to come (`rows`, in the order they will run,
        the first `now` of them the next generate call's) when that call would encode any: in
        low-memory mode on the CPU (residency.CpuReread) each encoding frees the UNet, so the text
        encoders are then read once for many batches instead of once per batch. Only rows with the
        first row's LoRA set (their encodings depend on it), at most ENCODE_AHEAD texts; rows whose
        text settings are invalid are passed over (their own generate call reports them). Returns how
        many texts it encoded."""
        keys: list[tuple] = []
        chosen: list[GenerationRow] = []
        signatures: dict = {}
        loras = None
        for i, row in enumerate(rows):
            if i == now and not keys:          # the next call encodes nothing: nothing to do yet
                break
            row_loras = tuple(tuple(pair) for pair in row.loras)
            loras = row_loras if loras is None else loras
            if row_loras != loras:
                break
            try:
                skip = clip_skip_layers(self.family, row.clip_skip)
            except ValueError:
                continue
            row_keys = [self._text_key(row, skip, signatures), self._text_key(row, skip, signatures, negative=True),
                        self._text_key(row, skip, signatures, filler=True)]
            keys += [k for k in row_keys if k not in self._text_cache and k not in keys]
            chosen.append(row)
            if len(keys) >= ENCODE_AHEAD:
                break
        if not keys:
            return 0
        try:
            self._use_loras(loras)
        except InputError:          # a LoRA set that cannot be applied: its own generate call says why
            return 0
        self._encode_missing(keys, chosen, skip_bad=True)
        return sum(k in self._text_cache for k in keys)

    def _embeddings(self, files: tuple[str, ...], rows: list[GenerationRow]) -> dict:
        """The embedding files -> {name: Embedding}, each checked against this model's text encoders;
        InputError naming the first row that gives the file otherwise."""
        from batchsd.model.embeddings import EmbeddingError, check_fits, load_embedding

        out = {}
        for path in files:
            try:
                embedding = load_embedding(path)
                check_fits(embedding, self.model, f"this {self.family.label} model")
            except EmbeddingError as e:
                where = next(i for i, r in enumerate(rows) if path in r.embeddings)
                raise InputError(f"row {where}, embeddings: {e}") from None
            out[embedding.name] = embedding
        return out

    def _encode_images(self, rows: list[GenerationRow], width: int, height: int,
                       generators: list[torch.Generator]) -> torch.Tensor:
        """Init images -> scaled clean latents: posterior mean + std * randn from each row's generator."""
        pixels = torch.cat([image_to_tensor(r.init_image, width, height) for r in rows])
        clean = []
        with self._on_device(self.model.vae), exact_numerics(self.exact, self.device):
            for chunk in range(0, len(rows), self.vae_chunk):
                batch = pixels[chunk:chunk + self.vae_chunk].to(self.device, self.vae_dtype)
                batch = batch.contiguous(memory_format=self.memory_format)
                mean, logvar = self.model.vae.encode(batch)
                for i in range(mean.shape[0]):
                    g = generators[chunk + i]
                    sample = torch.randn((1, *mean.shape[1:]), generator=g, dtype=torch.float32).to(self.device)
                    m, lv = mean[i:i + 1].float(), logvar[i:i + 1].float()
                    clean.append(m + torch.exp(0.5 * lv) * sample)
        return torch.cat(clean) * self.latent_scale

    def _guided_eps_model(self, cond: torch.Tensor, uncond: torch.Tensor, scales: list[float],
                          y_cond: torch.Tensor | None = None, y_uncond: torch.Tensor | None = None):
        """eps(x, t) with CFG: uncond + s * (cond - uncond) for rows with s != 1, in one UNet forward.
        y_cond/y_uncond: the UNet's vector input per row (SDXL), or None. Exact mode: one forward per
        row instead, of a shape the row fixes (exact.rowwise_guided_eps)."""
        if self.exact:
            return rowwise_guided_eps(self.unet, cond, uncond, scales, y_cond, y_uncond, dtype=self.dtype,
                                      memory_format=self.memory_format, device=self.device)
        guided = [i for i, s in enumerate(scales) if s != 1.0]
        idx = torch.tensor(guided, dtype=torch.long, device=self.device)
        context = torch.cat([uncond[idx], cond]) if guided else cond
        vector = None if y_cond is None else torch.cat([y_uncond[idx], y_cond]) if guided else y_cond
        extra = () if vector is None else (vector,)
        scale = torch.tensor([scales[i] for i in guided], dtype=torch.float32, device=self.device).view(-1, 1, 1, 1)
        unet, dtype, n = self.unet, self.dtype, len(guided)

        def eps_model(x: torch.Tensor, t: float) -> torch.Tensor:
            x_in = torch.cat([x[idx], x]) if guided else x
            timesteps = torch.full((x_in.shape[0],), float(t), dtype=torch.float32, device=x.device)
            x_in = x_in.to(dtype).contiguous(memory_format=self.memory_format)
            out = unet(x_in, timesteps, context, *extra).float()
            if not guided:
                return out
            eps_uncond, eps = out[:n], out[n:].clone()
            eps[idx] = eps_uncond + scale * (eps[idx] - eps_uncond)
            return eps

        return eps_model

    def _context_projections(self):
        """Around the sampling loop: the cross-attentions' K/V projections of the text context kept
        across steps (fast/context_projections.py), in eager mode (not under torch.compile)."""
        return contextlib.nullcontext() if self.compiled else reuse_context_projections(self.model.unet)

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents -> images, `vae_chunk` at a time; on CUDA a chunk's pixels travel to the host (uint8,
        pinned, non-blocking) and become PIL images while the GPU decodes the next chunk."""
        images, pending = [], None
        with self._on_device(self.model.vae), exact_numerics(self.exact, self.device):
            for chunk in range(0, latents.shape[0], self.vae_chunk):
                z = latents[chunk:chunk + self.vae_chunk] / self.latent_scale
                z = z.to(self.vae_dtype).contiguous(memory_format=self.memory_format)
                copy = to_host(pixels_to_uint8(self.model.vae.decode(z)))
                if pending is not None:
                    images.extend(arrays_to_images(host_array(pending)))
                pending = copy
        if pending is not None:
            images.extend(arrays_to_images(host_array(pending)))
        return images

    def _use_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Make `loras` the model's adapter set (model/lora.py side paths: the base weights are never
        written, so removing a set restores the model exactly); kept until another set is asked for, so a
        job whose batches are grouped by set applies each set once. Text encodings made under another
        set are dropped."""
        signature = file_signatures(path for path, _ in loras)   # a file replaced at its path is read again
        if loras == self.loras and (not loras or signature == self._lora_signature):
            return
        from batchsd.model.lora import apply_loras

        if self._applied_loras is not None:
            self._applied_loras.remove()
            self._applied_loras, self.loras, self._lora_signature = None, (), None
            self._text_cache.clear()
        if loras:
            self._applied_loras = apply_loras(self.model, [(path, multiplier) for path, multiplier in loras])
            self.loras, self._lora_signature = tuple(loras), signature
            self._text_cache.clear()

    def _on_device(self, module: torch.nn.Module):
        """Around each use of a part (the text encoders, the UNet, the VAE): residency.py."""
        return self.residency.using(module)


def file_signatures(paths) -> str | None:
    """hash_cache.stamp of the files (size, times, inode): what tells a file replaced at the same path.
    None when one is missing (its reader then raises the error)."""
    try:
        return stamp([Path(p) for p in paths])
    except OSError:
        return None


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> [1, 3, H, W] float32 in [-1, 1] (8-bit RGB by init_pixels.rgb_pixels); resized with
    Lanczos when its size differs (diffusers)."""
    image = rgb_pixels(image)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in about [-1, 1] -> uint8 [B, H, W, 3] on the same device, rounded as diffusers'
    numpy_to_pil: float32 (x / 2 + 0.5).clamp(0, 1) * 255, rounded half to even."""
    scaled = (pixels.float() / 2 + 0.5).clamp(0, 1) * 255
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1)


def arrays_to_images(array: np.ndarray) -> list[Image.Image]:
    """uint8 [B, H, W, 3] -> RGB PIL images."""
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]

