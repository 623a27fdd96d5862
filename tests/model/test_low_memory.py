"""`--low-memory` on the CPU (model/residency.py, CpuReread): the text encoders and the UNet are never
held together, each read again from the checkpoint when needed. What it must keep: the same bits as
the default (every part read again exactly as at load, the speed paths' derived weights rebuilt,
adapters still applied), each part freed when the other runs, reads only when a batch has new
texts (Pipeline.encode_ahead), and a clear error when the file changed under the run.

The model is SDXL's real topology at small widths (ref_sdxl.SDXL_TEST): two text encoders, the
largest share of weights a part can free."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from batchsd import GenerationRow, Pipeline  # noqa: E402
from batchsd.errors import CheckpointError, InputError  # noqa: E402
from batchsd.model.residency import AllHeld, CpuReread, is_released  # noqa: E402

from ref_lora import write_kohya_lora  # noqa: E402
from ref_sdxl import SDXL_TEST, build_reference_sdxl, write_sdxl_folder, write_sdxl_single_file  # noqa: E402
from test_lora import unet_sgm_names  # noqa: E402
from test_pipeline_parity import init_image  # noqa: E402
from cli_support import invoke  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("low_memory")
    ref = build_reference_sdxl(SDXL_TEST)
    lora = write_kohya_lora(folder / "kohya.safetensors", ref["unet"],
                            {"te1": ref["text_encoder"], "te2": ref["text_encoder_2"]}, seed=3,
                            sgm_names=unet_sgm_names(ref["unet"]))
    return dict(path=write_sdxl_single_file(folder / "sdxl.safetensors", ref), lora=lora,
                folder=write_sdxl_folder(folder / "sdxl", ref))


def row(prompt: str, seed: int, **kwargs) -> GenerationRow:
    return GenerationRow(prompt, negative_prompt=kwargs.pop("negative_prompt", "blurry"), seed=seed, steps=2,
                         sampler="euler", width=64, height=64, **kwargs)


def batches(lora) -> list[list[GenerationRow]]:
    """Four calls: new texts, new texts again, the first texts under a LoRA (which drops the text
    cache: the text encoders run with the adapter's text-encoder terms), image-to-image with new texts
    (the VAE's encoder, held throughout)."""
    return [[row("a red cube", 1)], [row("a blue sphere on grass", 2), row("a cat", 3)],
            [row("a red cube", 4, loras=((str(lora), 0.8),))],
            [row("a watercolour of a harbour", 5, init_image=init_image(64, 64), strength=0.6)]]


@pytest.mark.parametrize("dtype,speed", [
    ("fp32", {}),
    # the speed paths whose weights are derived from the UNet's: packed and Winograd-transformed
    # convolutions, the fused attention and linear epilogues
    ("bf16", dict(winograd=True, fused_attention=True, fused_epilogues=True)),
], ids=["fp32", "bf16-fast-paths"])
def test_low_memory_gives_the_same_bits(sdxl, dtype, speed):
    held = Pipeline.load(sdxl["path"], device="cpu", dtype=dtype, **speed)
    low = Pipeline.load(sdxl["path"], device="cpu", dtype=dtype, low_memory=True, **speed)
    assert isinstance(held.residency, AllHeld) and isinstance(low.residency, CpuReread)
    assert is_released(low.model.unet) and not is_released(low.text_encoders)   # the UNet waits for its first use
    for batch in batches(sdxl["lora"]):
        a, b = held.generate(batch), low.generate(batch)
        assert torch.equal(a.latents, b.latents)
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
        assert is_released(low.text_encoders) and not is_released(low.model.unet)
    # the UNet read at the first batch and after each re-encoding; the text encoders for batches 2-4
    assert low.residency.reads == {"text": 3, "unet": 4}


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of the CPU tensors `module` reaches: parameters, buffers and the tensors its modules keep
    beside them (a packed copy, derived weights)."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from tensors(v)
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)

    seen = {}
    for m in module.modules():
        for t in tensors(m.__dict__):
            if t.device.type == "cpu" and t.layout == torch.strided:
                seen[t.data_ptr()] = t.untyped_storage().nbytes()
            elif t.device.type == "cpu":                                  # an opaque (oneDNN) packed tensor
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def test_each_part_is_freed_while_the_other_runs(sdxl):
    low = Pipeline.load(sdxl["path"], device="cpu", dtype="bf16", low_memory=True, winograd=True,
                        fused_attention=True, fused_epilogues=True)
    low.generate([row("a red cube", 1)])
    unet_bytes = held_bytes(low.model.unet)
    assert unet_bytes > sum(p.numel() * 2 for p in low.model.unet.parameters()) // 2
    with low._on_device(low.text_encoders):
        assert is_released(low.model.unet) and not is_released(low.text_encoders)
        assert held_bytes(low.model.unet) == 0                 # nor a packed or Winograd-transformed copy
    with low._on_device(low.model.unet):
        assert is_released(low.text_encoders) and held_bytes(low.text_encoders) == 0
        assert held_bytes(low.model.unet) > 0
    low.generate([row("a red cube", 1)])
    assert held_bytes(low.model.unet) == unet_bytes             # packed again, as after the first read
    assert not is_released(low.model.vae)                                    # held throughout


def test_a_diffusers_folder_is_read_again_the_same(sdxl):
    held = Pipeline.load(sdxl["folder"], device="cpu", dtype="fp32")
    low = Pipeline.load(sdxl["folder"], device="cpu", dtype="fp32", low_memory=True)
    for batch in batches(sdxl["lora"])[:2]:
        assert torch.equal(held.generate(batch).latents, low.generate(batch).latents)
    assert low.residency.reads == {"text": 1, "unet": 2}


def test_a_ckpt_file_is_read_again_the_same(tmp_path):
    """A pickled .ckpt (read through torch.load's mapping) read again gives the same bits."""
    from batchsd.model.config import TINY
    from batchsd.model.stable_diffusion import StableDiffusionModel

    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": StableDiffusionModel.random(TINY, seed=3).state_dict()}, path)
    held = Pipeline.load(path, device="cpu", dtype="fp32")
    low = Pipeline.load(path, device="cpu", dtype="fp32", low_memory=True)
    for batch in ([row("a red cube", 1)], [row("a blue sphere", 2)], [row("a red cube", 3)]):
        assert torch.equal(held.generate(batch).latents, low.generate(batch).latents)
    assert low.residency.reads == {"text": 1, "unet": 2}


def test_encode_ahead_reads_the_text_encoders_once_for_many_batches(sdxl):
    low = Pipeline.load(sdxl["path"], device="cpu", dtype="fp32", low_memory=True)
    rows = [row(f"a lighthouse number {i}", i) for i in range(5)]
    bad = row("a bad clip skip", 9, clip_skip=99)                  # passed over; its own call raises
    other_set = row("not encoded: another LoRA set", 10, loras=((str(sdxl["lora"]), 1.0),))
    # 5 prompts + their shared negative "blurry" + the empty text that pads chunks
    assert low.encode_ahead(iter([rows[0], bad, *rows[1:], other_set]), now=1) == 7
    for r in rows:
        low.generate([r])
    assert low.residency.reads == {"text": 0, "unet": 1}
    assert low.encode_ahead(iter(rows), now=1) == 0                # all encoded: nothing read
    with pytest.raises(InputError, match="clip_skip"):
        low.generate([bad])
    low.generate([other_set])
    assert low.residency.reads == {"text": 1, "unet": 2}


def test_a_checkpoint_changed_during_the_run_is_named(sdxl, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    shutil.copyfile(sdxl["path"], path)
    low = Pipeline.load(path, device="cpu", dtype="fp32", low_memory=True)
    low.generate([row("a red cube", 1)])
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))    # replaced (or touched) since the load
    with pytest.raises(CheckpointError, match=r"sdxl\.safetensors changed since the run loaded it"):
        low.generate([row("a new prompt", 2)])


def test_low_memory_defaults_refuses_compile_and_leaves_tiny_held(sdxl):
    # batchsd run's default (None: devices.default_low_memory) is on for the CPU; the API's is off
    assert isinstance(Pipeline.load(sdxl["path"], device="cpu", low_memory=None).residency, CpuReread)
    assert isinstance(Pipeline.load(sdxl["path"], device="cpu").residency, AllHeld)
    with pytest.raises(InputError, match="--low-memory on the CPU"):
        Pipeline.load(sdxl["path"], device="cpu", dtype="fp32", low_memory=True, compile="default")
    tiny = Pipeline.load("tiny", device="cpu", low_memory=True)     # no file to read again from
    assert isinstance(tiny.residency, AllHeld) and not tiny.low_memory_cpu


def test_a_job_with_low_memory_makes_the_same_files(tmp_path):
    from safetensors.torch import save_file

    from batchsd.model.config import TINY
    from batchsd.model.stable_diffusion import StableDiffusionModel

    ckpt = tmp_path / "tiny.safetensors"
    model = StableDiffusionModel.random(TINY, seed=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("id,prompt,seed,steps,width,height\n" +
                        "".join(f"r{i},prompt number {i % 4},{i},2,64,64\n" for i in range(6)))
    made = {}
    for name, extra in [("held", ["--no-low-memory"]), ("low", [])]:          # on by default for the CPU
        r = invoke("run", str(manifest), "--model", str(ckpt), "--out", str(tmp_path / name), "--batch-size", "2",
                   "--device", "cpu", *extra)
        assert r.exit_code == 0, r.output
        assert ("held in turn" in r.output) == (name == "low")
        made[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name / "images").glob("*.png"))}
    assert len(made["held"]) == 6 and made["held"] == made["low"]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd2_files_are_read_again_the_same(tmp_path, prediction):
    """SD 2.x (OpenCLIP under `cond_stage_model.model.`): a v-prediction file whose yaml says so and an
    epsilon file given its prediction type; a long A1111 prompt (2 chunks, padded by the empty text)."""
    from ref_sd2 import SD2_TEST, build_reference_sd2, write_ldm_yaml, write_sd2_single_file

    path = write_sd2_single_file(tmp_path / "sd2.safetensors", build_reference_sd2(SD2_TEST, prediction))
    kwargs = {}
    if prediction == "v_prediction":
        write_ldm_yaml(tmp_path / "sd2.yaml", prediction)
    else:
        kwargs["prediction_type"] = prediction
    held = Pipeline.load(path, device="cpu", dtype="fp32", **kwargs)
    low = Pipeline.load(path, device="cpu", dtype="fp32", low_memory=True, **kwargs)
    assert low.family.scheduler.prediction_type == prediction
    long = "a very detailed painting of a lighthouse on a cliff at dusk, " * 8
    for batch in ([row("a red cube", 1)], [row(long, 2, prompt_syntax="a1111")], [row("a cat", 3)]):
        assert torch.equal(held.generate(batch).latents, low.generate(batch).latents)
    assert low.residency.reads == {"text": 2, "unet": 3}
