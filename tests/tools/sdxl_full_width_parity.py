"""Full-width SDXL base parity: batchsd against diffusers' StableDiffusionXLPipeline on the same random
weights (issue 16's proof at full width; tests/model/test_sdxl.py proves it at tiny widths).

    python tests/tools/sdxl_full_width_parity.py [--dir DIR] [--size 256] [--steps 3] [--no-folder]

The model: batchsd.model.config.SDXL's shapes (2.57 G UNet parameters, CLIP ViT-L + OpenCLIP ViT-bigG),
random weights drawn by tests/model/ref_sdxl.py's builders with the seeds build_reference_sdxl uses, held
in bf16 (half the disk and memory). It is written twice from the same bf16 tensors: as an sgm single file
(ref_sdxl.write_sdxl_single_file's layout) and as a diffusers folder (ref_sdxl.write_sdxl_folder). Both
runs compute in fp32 on these bf16-rounded weights (the upcast is exact): fp32 against fp32.

Stages, each in a fresh subprocess so that no two models are ever held at once; a stage starts when the
machine's available memory can hold it and is stopped (then retried) when other jobs leave it too little:
  write      the bf16 reference components -> DIR/sdxl-random-bf16.safetensors and DIR/sdxl-random-bf16/
             (skipped when both exist, and kept: the load-memory tool and the SDXL benchmark use them)
  reference  diffusers from the folder: the text encoders alone in fp32 (encode_prompt), freed, then
             StableDiffusionXLPipeline with the fp32 VAE and the UNet computing in fp32 from bf16-stored
             weights (fp32_on_call, proven equal to an fp32 copy on the tiny topology at each run) on
             those embeddings, output_type="latent", then the VAE decode as ref_sdxl.sdxl_run does it
             (skipped when its output is newer than the model file)
  batchsd    batchsd's Pipeline.load(single file, fp32) as shipped, the same rows
  folder     batchsd's Pipeline.load(diffusers folder, fp32), the first row: latents equal to the file's
Rows: 256x256 (--size), 3 steps (--steps), euler and dpmpp_2m_karras, cfg 7.5, a negative prompt.
Tolerances: tests/model/test_sdxl.py's (>= 99.9% of pixel values within 1/255, latents within 2e-3
relative to the reference's max |latent|). Prints each stage's time and peak RSS (VmHWM, GiB) and exits
non-zero when a figure is out of tolerance. Figures and their cost: docs/performance.md, "SDXL".
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT, ROOT / "tests" / "model", ROOT / "tests" / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

DEFAULT_DIR = Path(os.environ.get("BATCHSD_BENCH_CACHE", Path.home() / ".cache" / "batchsd-bench"))
FILE_NAME = "sdxl-random-bf16.safetensors"
FOLDER_NAME = "sdxl-random-bf16"
SEED = 60                     # build_reference_sdxl's default: text encoders seed, seed+1, UNet +2, VAE +3
SAMPLERS = ("euler", "dpmpp_2m_karras")
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality, watermark"


def rows(size: int, steps: int) -> list[dict]:
    return [dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=100 + i, steps=steps, cfg_scale=7.5, sampler=s,
                 width=size, height=size) for i, s in enumerate(SAMPLERS)]


# ---------------------------------------------------------------- stage: write
def build_bf16_reference() -> dict:
    """ref_sdxl.build_reference_sdxl(SDXL)'s components in bf16, drawn one at a time: the UNet straight
    into bf16 parameters (its fp32 copy alone would be 10 GB), the others drawn in fp32 and cast."""
    from diffusers import UNet2DConditionModel

    from batchsd.model.config import SDXL
    from ref_sdxl import _clip_g, _clip_l, build_reference_vae, sdxl_tokenizers, sdxl_unet_config
    from ref_unet import randomize_

    tokenizer, tokenizer_2 = sdxl_tokenizers()
    ref = dict(tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    ref["text_encoder"] = _clip_l(SDXL.clip, SEED).to(torch.bfloat16)
    ref["text_encoder_2"] = _clip_g(SDXL.clip2, SEED + 1).to(torch.bfloat16)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config(SDXL.unet))
    unet = unet.to(torch.bfloat16).to_empty(device="cpu")
    assert not list(unet.buffers()), "to_empty would leave buffers uninitialized"
    randomize_(unet, SEED + 2)
    ref["unet"] = unet.eval()
    ref["vae"] = build_reference_vae(SDXL.vae, SEED + 3).to(torch.bfloat16)
    return ref


def stage_write(folder: Path) -> dict:
    from ref_sdxl import write_sdxl_folder, write_sdxl_single_file

    t0 = time.perf_counter()
    ref = build_bf16_reference()
    built = time.perf_counter() - t0
    write_sdxl_single_file(folder / FILE_NAME, ref, dtype=torch.bfloat16)   # the bf16 tensors as they are
    gc.collect()
    write_sdxl_folder(folder / FOLDER_NAME, ref)
    params = sum(p.numel() for k in ("text_encoder", "text_encoder_2", "unet", "vae") for p in ref[k].parameters())
    return dict(build_s=built, total_s=time.perf_counter() - t0, params=params,
                file_gb=(folder / FILE_NAME).stat().st_size / 1e9)


# ---------------------------------------------------------------- stage: reference (diffusers)
def bf16_component(subfolder: Path) -> torch.nn.Module:
    """A diffusers model of the folder's config.json, its bf16 parameters read one tensor at a time from
    the folder's weights file (from_pretrained holds the whole state dict beside the model)."""
    import diffusers
    from safetensors import safe_open

    config = json.loads((subfolder / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    params = model.state_dict()
    with safe_open(subfolder / "diffusion_pytorch_model.safetensors", "pt") as f, torch.no_grad():
        if set(f.keys()) != set(params):
            raise RuntimeError(f"{subfolder}: file keys differ from the model's: {sorted(set(f.keys()) ^ set(params))[:5]}")
        for key, p in params.items():
            p.copy_(f.get_tensor(key))
    return model.eval()


def fp32_on_call(model: torch.nn.Module) -> torch.nn.Module:
    """Compute in fp32 with weights kept in bf16: each module's own parameters are upcast (exactly) for
    the duration of its forward and dropped after. Same arithmetic as an fp32 copy of the model (a
    parameter a forward reads outside its own module would stay bf16 and fail loudly in a mixed-dtype
    op); proven equal to one on the tiny SDXL UNet by `check_fp32_on_call`. The UNet's weights stay
    half the size of an fp32 copy's."""
    for module in model.modules():
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if not names:
            continue

        def upcast(mod, args, names=names):
            mod._stored = {n: mod._parameters[n] for n in names}
            for n in names:
                mod._parameters[n] = torch.nn.Parameter(mod._stored[n].float(), requires_grad=False)

        def restore(mod, args, output):
            mod._parameters.update(mod._stored)
            del mod._stored

        module.register_forward_pre_hook(upcast)
        module.register_forward_hook(restore)
    # what the pipeline casts the UNet's inputs to (ModelMixin.dtype: its first parameter's otherwise)
    model.__class__ = type(type(model).__name__, (type(model),), {"dtype": property(lambda self: torch.float32)})
    return model


@torch.no_grad()
def check_fp32_on_call() -> None:
    """fp32_on_call(bf16 UNet) gives exactly the output of the fp32 UNet of the same (bf16-rounded)
    weights, on ref_sdxl's tiny SDXL topology (the same diffusers classes as the full width)."""
    from ref_sdxl import SDXL_TEST, build_reference_unet

    fp32 = build_reference_unet(SDXL_TEST.unet, 1).to(torch.bfloat16).float()
    hooked = fp32_on_call(build_reference_unet(SDXL_TEST.unet, 1).to(torch.bfloat16))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, SDXL_TEST.unet.context_dim, generator=g)
    cond = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}
    a, b = (m(x, torch.tensor([500.0, 500.0]), encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
            for m in (fp32, hooked))
    if (not torch.equal(a, b) or hooked.dtype != torch.float32
            or not all(p.dtype == torch.bfloat16 for p in hooked.parameters())):
        raise SystemExit(f"fp32_on_call differs from an fp32 copy: max |diff| {(a - b).abs().max().item():.2e}")


@torch.no_grad()
def stage_reference(folder: Path, plan: list[dict], out: Path) -> dict:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as dlogging

    from ref_sdxl import reference_scheduler
    from test_sdxl import REFERENCE_SCHEDULERS

    dlogging.disable_progress_bar()
    check_fp32_on_call()
    t0 = time.perf_counter()
    text = StableDiffusionXLPipeline.from_pretrained(folder / FOLDER_NAME, unet=None, vae=None,
                                                     torch_dtype=torch.float32)
    embeds = {}
    for r in plan:     # (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)
        embeds[r["sampler"]] = text.encode_prompt(r["prompt"], device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True,
                                                  negative_prompt=r["negative_prompt"] or None)
    text_s = time.perf_counter() - t0
    del text
    gc.collect()
    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(folder / FOLDER_NAME, text_encoder=None, text_encoder_2=None,
                                                     unet=fp32_on_call(bf16_component(folder / FOLDER_NAME / "unet")),
                                                     vae=bf16_component(folder / FOLDER_NAME / "vae").float())
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    results, run_s = {}, {}
    for r in plan:
        cls, extra = REFERENCE_SCHEDULERS[r["sampler"]]
        pipe.scheduler = reference_scheduler(cls, **extra)
        cond, uncond, pooled, uncond_pooled = embeds[r["sampler"]]
        t0 = time.perf_counter()
        latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
                       negative_pooled_prompt_embeds=uncond_pooled, width=r["width"], height=r["height"],
                       num_inference_steps=r["steps"], guidance_scale=r["cfg_scale"],
                       generator=torch.Generator("cpu").manual_seed(r["seed"]), output_type="latent").images
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample     # as ref_sdxl.sdxl_run
        image = pipe.image_processor.postprocess(pixels, output_type="np")[0]
        run_s[r["sampler"]] = time.perf_counter() - t0
        results[r["sampler"]] = dict(latents=latents.float(), image=torch.from_numpy((image * 255).round().astype("uint8")))
    torch.save(results, out)
    return dict(text_s=text_s, load_s=load_s, run_s=run_s)


# ---------------------------------------------------------------- stages: batchsd
@torch.no_grad()
def stage_batchsd(model: Path, plan: list[dict], out: Path) -> dict:
    import numpy as np

    from batchsd import GenerationRow, Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(model, device="cpu", dtype="fp32")
    load_s = time.perf_counter() - t0
    results, run_s = {}, {}
    for r in plan:
        t0 = time.perf_counter()
        got = pipe.generate([GenerationRow(**r)])
        run_s[r["sampler"]] = time.perf_counter() - t0
        results[r["sampler"]] = dict(latents=got.latents, image=torch.from_numpy(np.asarray(got.images[0])))
    torch.save(results, out)
    return dict(load_s=load_s, run_s=run_s, exact=pipe.exact)


# ---------------------------------------------------------------- driver
# free memory a stage waits for, GiB: its peak RSS (batchsd's fp32 SDXL is 13.9 GB of weights alone)
STAGE_NEEDS_GIB = {"write": 8, "reference": 11, "batchsd": 14, "folder": 14}
LOW_MEMORY_GIB = 0.75


def available_gib() -> float:
    return next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemAvailable:")) / 2**20


def wait_for_memory(gib: float, stage: str, patience_s: float = 1800) -> None:
    """On a machine shared with other jobs: start a stage only when MemAvailable can hold it."""
    t0 = time.perf_counter()
    while (available := available_gib()) < gib:
        if time.perf_counter() - t0 > patience_s:
            raise SystemExit(f"stage {stage} needs {gib} GiB; only {available:.1f} GiB available for {patience_s:.0f} s")
        print(f"stage {stage} waits: {available:.1f} GiB available, needs {gib}", flush=True)
        time.sleep(20)


def run_stage(stage: str, args: argparse.Namespace, tries: int = 3) -> dict:
    """This script as `--stage stage` in a fresh process; its last stdout line is its JSON report. The
    stage is stopped (and started again once memory is back) when the machine's available memory falls
    under LOW_MEMORY_GIB: other jobs grew, and the kernel would otherwise start evicting everyone's pages."""
    cmd = [sys.executable, __file__, "--stage", stage, "--dir", str(args.dir), "--size", str(args.size),
           "--steps", str(args.steps)]
    for attempt in range(tries):
        wait_for_memory(STAGE_NEEDS_GIB[stage], stage)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.extend(proc.communicate()))
        reader.start()
        while reader.is_alive():
            reader.join(2)
            if reader.is_alive() and available_gib() < LOW_MEMORY_GIB:
                proc.kill()
                reader.join()
                print(f"stage {stage} stopped: under {LOW_MEMORY_GIB} GiB available; will start again", flush=True)
                break
        else:
            if proc.returncode:
                raise RuntimeError(f"stage {stage} failed ({proc.returncode}):\n{out[1][-4000:]}")
            report = json.loads(out[0].strip().splitlines()[-1])
            report["wall_s"] = time.perf_counter() - t0
            print(f"stage {stage:9s} {report['wall_s']:6.0f} s wall, peak RSS {report['peak_rss_gib']:5.2f} GiB  "
                  + json.dumps({k: v for k, v in report.items() if k not in ("wall_s", "peak_rss_gib")},
                               default=lambda x: round(x, 1)), flush=True)
            return report
    raise SystemExit(f"stage {stage}: stopped {tries} times for want of memory")


def compare(reference: dict, ours: dict) -> tuple[float, int, float, float]:
    """(latents max |diff| / max |reference|, max |pixel diff|, share of pixel values within PIXEL_TOL,
    share of the reference's pixel values not clipped to 0 or 255: random weights saturate many, and a
    saturated value agrees more easily)."""
    from test_sdxl import PIXEL_TOL

    rel = ((ours["latents"] - reference["latents"]).abs().max() / reference["latents"].abs().max()).item()
    diff = (ours["image"].to(torch.int16) - reference["image"].to(torch.int16)).abs()
    unclipped = ((reference["image"] > 0) & (reference["image"] < 255)).double().mean().item()
    return rel, int(diff.max()), (diff <= PIXEL_TOL).double().mean().item(), unclipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"where the model files are kept (default {DEFAULT_DIR})")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-folder", action="store_true", help="skip the diffusers-folder round trip")
    ap.add_argument("--stage", choices=["write", "reference", "batchsd", "folder"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    plan = rows(args.size, args.steps)
    tag = f"{args.size}px-{args.steps}steps"
    if args.stage:
        report = {"write": lambda: stage_write(args.dir),
                  "reference": lambda: stage_reference(args.dir, plan, args.dir / f"sdxl-reference-{tag}.pt"),
                  "batchsd": lambda: stage_batchsd(args.dir / FILE_NAME, plan, args.dir / f"sdxl-batchsd-{tag}.pt"),
                  "folder": lambda: stage_batchsd(args.dir / FOLDER_NAME, plan[:1], args.dir / f"sdxl-folder-{tag}.pt"),
                  }[args.stage]()
        from bench_common import peak_rss_gib

        print(json.dumps({**report, "peak_rss_gib": peak_rss_gib(own=True)}))
        return 0

    from test_sdxl import LATENT_REL_TOL, PIXEL_SHARE, PIXEL_TOL

    print(f"SDXL full width, {args.size}x{args.size}, {args.steps} steps, cfg 7.5, negative prompt, fp32 compute on "
          f"bf16 weights; torch {torch.__version__}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    if not ((args.dir / FILE_NAME).is_file() and (args.dir / FOLDER_NAME / "model_index.json").is_file()):
        run_stage("write", args)
    reference_path = args.dir / f"sdxl-reference-{tag}.pt"
    if reference_path.is_file() and reference_path.stat().st_mtime > (args.dir / FILE_NAME).stat().st_mtime:
        print(f"stage reference: kept from {time.ctime(reference_path.stat().st_mtime)} ({reference_path.name}, "
              f"newer than the model)", flush=True)
    else:
        run_stage("reference", args)
    run_stage("batchsd", args)
    reference = torch.load(reference_path)
    ours = torch.load(args.dir / f"sdxl-batchsd-{tag}.pt")
    failures = []
    for sampler in SAMPLERS:
        rel, max_diff, share, unclipped = compare(reference[sampler], ours[sampler])
        print(f"t2i {sampler:16s} latents rel {rel:.1e}  pixels max |diff| {max_diff}  within {PIXEL_TOL}/255 {share:.5f}"
              f"  (reference values not clipped: {unclipped:.3f})")
        if rel > LATENT_REL_TOL or share < PIXEL_SHARE:
            failures.append(sampler)
    if not args.no_folder:
        run_stage("folder", args)
        folder = torch.load(args.dir / f"sdxl-folder-{tag}.pt")
        first = SAMPLERS[0]
        equal = torch.equal(folder[first]["latents"], ours[first]["latents"])
        print(f"diffusers folder vs single file ({first}): latents {'equal' if equal else 'DIFFERENT'}")
        if not equal:
            failures.append("folder")
    print("PASS" if not failures else f"FAIL: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
