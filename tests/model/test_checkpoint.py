"""Checkpoint loading: formats, layouts, config inference, strict key checks, safety, dtypes, hashes."""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from batchsd.errors import CheckpointError
from batchsd.model.checkpoint import infer_config, inspect_checkpoint, load_model
from batchsd.model.config import SD15, TINY, CLIPTextConfig, SDConfig, UNetConfig, VAEConfig
from batchsd.model.diffusers_layout import diffusers_to_original
from batchsd.model.stable_diffusion import CLIP_PREFIX, ORIGINAL_PREFIX, UNET_PREFIX, VAE_PREFIX, StableDiffusionModel
from ref_checkpoint import (SD15_KEYS, compose_original, extra_tensors, random_sd15_checkpoint,
                            write_diffusers_folder, write_original_checkpoint)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_components(cfg: SDConfig, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Random fp32 tensors for every model key (distinct values, so a swapped tensor shows)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in StableDiffusionModel(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {c: {} for c in ORIGINAL_PREFIX}
    for key, shape in shapes.items():
        component = next(c for c, p in ORIGINAL_PREFIX.items() if key.startswith(p))
        out[component][key[len(ORIGINAL_PREFIX[component]):]] = torch.randn(shape, generator=gen)
    return out


def write_tiny(path: Path, dtype=torch.float16, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """A TINY single-file checkpoint; returns its model tensors (original keys, in `dtype`)."""
    parts = random_components(TINY, seed)
    write_original_checkpoint(path, parts["unet"], parts["vae"], parts["text_encoder"], dtype, **kwargs)
    return compose_original(parts["unet"], parts["vae"], parts["text_encoder"], dtype, extras=False)


def assert_model_equals(model: StableDiffusionModel, expected: dict[str, torch.Tensor], dtype: torch.dtype):
    sd = model.state_dict()
    assert set(sd) == set(expected)
    for key, value in expected.items():
        assert sd[key].dtype == dtype, key
        assert torch.equal(sd[key], value.to(dtype)), key


def sha256_of(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- config inference

def test_infer_config_sd15_and_tiny():
    table = json.loads(SD15_KEYS.read_text())
    assert infer_config(table) is SD15  # shapes only (lists), non-model keys present
    tiny = compose_original(*random_components(TINY, 0).values(), torch.float16)
    assert infer_config(tiny) is TINY


def test_infer_config_custom_topology():
    cfg = SDConfig(
        "mine",
        CLIPTextConfig(vocab_size=1000, width=128, layers=3, heads=2, mlp_width=512),
        VAEConfig(base_channels=32, channel_mult=(1, 2, 4), res_blocks=1),
        UNetConfig(model_channels=64, channel_mult=(1, 2, 2), res_blocks=3, attention_levels=(1, 2),
                   context_dim=128),
    )
    got = infer_config(compose_original(*random_components(cfg, 0).values(), torch.float16))
    assert got == replace(cfg, name="custom")  # heads: CLIP width/64 = 2, UNet 8


def test_infer_config_rejects_other_families():
    with pytest.raises(CheckpointError, match="2.x"):
        infer_config({"cond_stage_model.model.token_embedding.weight": (49408, 1024),
                      UNET_PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3)})
    with pytest.raises(CheckpointError, match="SDXL"):
        infer_config({"conditioner.embedders.0.transformer.text_model.x": (1,)})


# ----------------------------------------------------------------------------- full-size file

def test_sd15_random_checkpoint_loads_fp16(tmp_path):
    path = random_sd15_checkpoint(tmp_path / "sd15.safetensors", torch.float16)
    model, info = load_model(path, dtype=torch.float16)
    assert model.cfg is SD15 and info.config_name == "sd15"
    assert (info.format, info.layout, info.dtype) == ("safetensors", "single-file", "float16")
    assert info.ignored_count == 15 and info.extra_keys == ()  # 12 DDPM buffers, 2 model_ema, position_ids
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    sd = model.state_dict()
    assert len(sd) == 686 + 248 + 196
    with safe_open(str(path), "pt") as f:  # the library's own reader as the oracle
        for key, value in sd.items():
            assert torch.equal(value, f.get_tensor(key)), key
    report = inspect_checkpoint(path, hash=False)
    assert report["config"] == "sd15" and report["loadable"]
    assert report["parameters"] == 1_066_235_307
    assert report["components"] == {"unet": 686, "vae": 248, "text_encoder": 196}
    assert report["ignored"] == 15 and report["extra"] == [] and report["dtypes"]["float16"] == 1130


# ----------------------------------------------------------------------------- formats and dtypes

def test_ckpt_wrapped_unwrapped_legacy_and_safetensors_equal(tmp_path):
    expected = write_tiny(tmp_path / "a.safetensors", torch.float16, seed=1)
    write_tiny(tmp_path / "b.ckpt", torch.float16, seed=1, fmt="ckpt")
    write_tiny(tmp_path / "c.ckpt", torch.float16, seed=1, fmt="ckpt", wrap=True)
    legacy = compose_original(*random_components(TINY, 1).values(), torch.float16)
    torch.save({"state_dict": legacy}, tmp_path / "d.ckpt", _use_new_zipfile_serialization=False)
    for name, fmt in (("a.safetensors", "safetensors"), ("b.ckpt", "ckpt"), ("c.ckpt", "ckpt"), ("d.ckpt", "ckpt")):
        model, info = load_model(tmp_path / name, dtype=torch.float16)
        assert info.format == fmt and info.config_name == "tiny"
        assert_model_equals(model, expected, torch.float16)


@pytest.mark.parametrize("source,target", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_dtype_conversion(tmp_path, source, target, fmt):
    expected = write_tiny(tmp_path / f"m.{fmt}", source, seed=2, fmt=fmt)
    model, info = load_model(tmp_path / f"m.{fmt}", dtype=target)
    assert info.dtype == str(source).removeprefix("torch.")
    assert_model_equals(model, expected, target)  # exactly the source values, cast once


@pytest.mark.parametrize("source,target", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_channels_last_load(tmp_path, source, target, fmt):
    """memory_format=channels_last (what Pipeline.load asks for): 4-D weights land in that layout
    with exactly the file's values, through the direct-read path and the converting one."""
    expected = write_tiny(tmp_path / f"m.{fmt}", source, seed=4, fmt=fmt)
    model, _ = load_model(tmp_path / f"m.{fmt}", dtype=target, memory_format=torch.channels_last)
    four_d = [t for t in model.state_dict().values() if t.dim() == 4]
    assert four_d and all(t.is_contiguous(memory_format=torch.channels_last) for t in four_d)
    assert any(not t.is_contiguous() for t in four_d)   # 3x3 kernels: really NHWC (1x1 ones are both)
    assert_model_equals(model, expected, target)


def test_mixed_dtype_file(tmp_path):
    parts = random_components(TINY, 3)
    sd = compose_original(parts["unet"], {}, {}, torch.float16, extras=False)
    sd |= compose_original({}, parts["vae"], parts["text_encoder"], torch.float32, extras=False)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    model, info = load_model(tmp_path / "mixed.safetensors", dtype=torch.float32)
    assert info.dtype == "float16+float32"  # most common first: the UNet has the most tensors
    assert_model_equals(model, sd, torch.float32)


# ----------------------------------------------------------------------------- strictness

def test_missing_mis_shaped_and_unexpected_keys_are_named(tmp_path):
    sd = compose_original(*random_components(TINY, 4).values(), torch.float16)
    dropped = VAE_PREFIX + "decoder.up.0.block.1.conv2.weight"
    reshaped = UNET_PREFIX + "output_blocks.4.1.proj_out.weight"
    # (not in the first spatial transformer of a level: those say the depth the config is inferred with)
    added = UNET_PREFIX + "input_blocks.2.1.transformer_blocks.1.norm1.weight"
    del sd[dropped]
    sd[reshaped] = sd[reshaped].reshape(sd[reshaped].shape[0], -1)  # a Linear where a 1x1 conv is expected
    sd[added] = torch.ones(32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.safetensors")
    message = str(err.value)
    assert f"missing tensors 1: {dropped}" in message
    assert f"mis-shaped tensors 1: {reshaped} [128, 128] (model needs [128, 128, 1, 1])" in message
    assert f"tensors the model does not have 1: {added}" in message
    report = inspect_checkpoint(tmp_path / "bad.safetensors", hash=False)
    assert not report["loadable"] and report["missing"] == [dropped] and report["unexpected"] == [added]
    assert report["mis_shaped"] == {reshaped: [[128, 128], [128, 128, 1, 1]]}


def test_many_missing_keys_listed_with_a_count(tmp_path):
    sd = compose_original(*random_components(TINY, 5).values(), torch.float16)
    gone = sorted(k for k in sd if k.startswith(CLIP_PREFIX + "encoder.layers.1."))  # 16 tensors
    for k in gone:
        del sd[k]
    save_file(sd, str(tmp_path / "short.safetensors"))
    # infer_config sees 1 CLIP layer now, so the shapes describe a 1-layer model: that loads as "custom".
    model, info = load_model(tmp_path / "short.safetensors", dtype=torch.float16)
    assert info.config_name == "custom" and model.cfg.clip.layers == 1
    # a genuine hole in the middle is missing keys, listed 10 at a time with a count
    del sd[UNET_PREFIX + "input_blocks.1.0.in_layers.0.weight"]
    for k in [k for k in sd if k.startswith(VAE_PREFIX + "encoder.mid.")]:
        del sd[k]
    save_file(sd, str(tmp_path / "holes.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors 2\d: .*\.\.\. \(1\d more\)"):
        load_model(tmp_path / "holes.safetensors")


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_files_load_converted_to_the_run_dtype(tmp_path, fp8):
    expected = {k: v.to(fp8) for k, v in write_tiny(tmp_path / "half.safetensors").items()}
    save_file(expected, str(tmp_path / "fp8.safetensors"))
    model, _ = load_model(tmp_path / "fp8.safetensors", dtype=torch.float32)
    assert_model_equals(model, expected, torch.float32)        # fp8 values, exactly, in fp32


def test_inspect_reads_the_weights_for_nan_and_inf(tmp_path):
    sd = write_tiny(tmp_path / "ok.safetensors")
    bad_key = sorted(sd)[3]
    sd[bad_key] = sd[bad_key].clone()
    sd[bad_key].view(-1)[0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    assert "non_finite" not in inspect_checkpoint(tmp_path / "nan.safetensors", hash=False)   # header only
    report = inspect_checkpoint(tmp_path / "nan.safetensors", hash=False, check_values=True)
    assert report["non_finite"] == [bad_key] and not report["loadable"] and "NaN or inf" in report["error"]
    good = inspect_checkpoint(tmp_path / "ok.safetensors", hash=False, check_values=True)
    assert good["non_finite"] == [] and good["loadable"]
    from cli_support import invoke
    r = invoke("inspect", str(tmp_path / "nan.safetensors"))
    assert r.exit_code == 1 and bad_key in r.output


def test_unsafe_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    sd = compose_original(*random_components(TINY, 6).values(), torch.float16)
    torch.save({"state_dict": sd, "callbacks": RunsCode()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"refused to load.*never runs code.*\.safetensors"):
        load_model(tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refused"):
        inspect_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_training_metadata_of_original_ckpt_files_is_read_as_data(tmp_path, monkeypatch):
    """The CompVis checkpoints (sd-v1-4.ckpt) hold PyTorch Lightning's ModelCheckpoint callback state
    and numpy numbers beside the weights: read as inert data, without pytorch_lightning."""
    import sys
    import types

    import numpy as np

    class ModelCheckpoint:                       # pickled under Lightning's name, as the originals are
        pass

    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module = types.ModuleType(ModelCheckpoint.__module__)
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", ModelCheckpoint.__module__):
        monkeypatch.setitem(sys.modules, name, module)
    callback = ModelCheckpoint()
    callback.monitor, callback.best_model_score = "val/loss", torch.tensor(0.12)
    sd = compose_original(*random_components(TINY, 6).values(), torch.float16)
    torch.save({"state_dict": sd, "global_step": np.int64(470000), "epoch": np.float64(6.0),
                "callbacks": {ModelCheckpoint: {"best_model_path": "x"}, "cb": callback}}, tmp_path / "orig.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", ModelCheckpoint.__module__):
        monkeypatch.delitem(sys.modules, name)
    model, info = load_model(tmp_path / "orig.ckpt", dtype=torch.float16)
    reference, _ = load_model(_saved(tmp_path / "plain.ckpt", {"state_dict": sd}), dtype=torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert inspect_checkpoint(tmp_path / "orig.ckpt", hash=False)["loadable"]
    assert "pytorch_lightning" not in sys.modules


def _saved(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_extras_ignored_by_list_and_unknown_reported(tmp_path):
    parts = random_components(TINY, 7)
    sd = compose_original(parts["unet"], parts["vae"], parts["text_encoder"], torch.float16, extras=True)
    sd["lora_unet_down.alpha"] = torch.ones(())
    save_file(sd, str(tmp_path / "extras.safetensors"))
    model, info = load_model(tmp_path / "extras.safetensors", dtype=torch.float16)
    assert info.ignored_count == len(extra_tensors()) == 16
    assert info.extra_keys == ("lora_unet_down.alpha",)
    report = inspect_checkpoint(tmp_path / "extras.safetensors", hash=False)
    assert report["loadable"] and report["extra"] == ["lora_unet_down.alpha"] and report["ignored"] == 16


def test_inpainting_unet_refused(tmp_path):
    cfg = replace(TINY, unet=replace(TINY.unet, in_channels=9))
    parts = random_components(cfg, 8)
    write_original_checkpoint(tmp_path / "inpaint.safetensors", *parts.values(), torch.float16)
    with pytest.raises(CheckpointError, match="9 input channels"):
        load_model(tmp_path / "inpaint.safetensors")
    report = inspect_checkpoint(tmp_path / "inpaint.safetensors", hash=False)
    assert report["config"] == "custom" and not report["loadable"] and "9 input channels" in report["error"]


def test_inspect_unsupported_family(tmp_path):
    sd = {"cond_stage_model.model.token_embedding.weight": torch.zeros(10, 4),
          UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3), "betas": torch.zeros(1000)}
    save_file(sd, str(tmp_path / "sd2.safetensors"))
    report = inspect_checkpoint(tmp_path / "sd2.safetensors", hash=False)
    assert report["config"] is None and not report["loadable"] and "2.x" in report["error"]
    assert report["ignored"] == 1 and sorted(report["extra"]) == sorted(k for k in sd if k != "betas")


def test_text_encoder_without_text_model_level_in_single_file(tmp_path):
    expected = compose_original(*random_components(TINY, 9).values(), torch.float16, extras=False)
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in expected.items()}
    save_file(old, str(tmp_path / "old.safetensors"))
    model, _ = load_model(tmp_path / "old.safetensors", dtype=torch.float16)
    assert_model_equals(model, expected, torch.float16)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a model file " * 4)
    with pytest.raises(CheckpointError, match="neither a safetensors file nor a PyTorch checkpoint"):
        load_model(tmp_path / "junk.safetensors")
    (tmp_path / "bad-header.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(tmp_path / "bad-header.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "absent.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="diffusers model folder.*; it has none of them"):
        load_model(tmp_path / "folder")
    for part in ("unet", "text_encoder"):
        (tmp_path / "folder" / part).mkdir()
    with pytest.raises(CheckpointError, match="it has unet/, text_encoder/ but no vae/"):
        load_model(tmp_path / "folder")
    sd = compose_original(*random_components(TINY, 10).values(), torch.float16)
    save_file(sd, str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "cut.safetensors")
    # two tensors pointed at the same bytes (the safetensors library refuses it: a damaged index)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    by_size: dict[int, str] = {}
    for key in (k for k in header if k != "__metadata__"):
        begin, end = header[key]["data_offsets"]
        if (first := by_size.setdefault(end - begin, key)) != key:
            header[key]["data_offsets"] = header[first]["data_offsets"]
            break
    else:
        raise AssertionError("no two tensors of one size")
    (tmp_path / "shared.safetensors").write_bytes(data[:8] + json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
                                                  + data[8 + header_len:])
    with pytest.raises(CheckpointError, match="overlapping or missing data"):
        load_model(tmp_path / "shared.safetensors")


def test_sha256_of_file(tmp_path):
    write_tiny(tmp_path / "h.safetensors", seed=11)
    _, info = load_model(tmp_path / "h.safetensors", dtype=torch.float16)
    assert info.sha256 == sha256_of(tmp_path / "h.safetensors")
    assert info.short_hash == info.sha256[:10]
    assert inspect_checkpoint(tmp_path / "h.safetensors")["short_hash"] == info.short_hash


def test_hash_cache_across_processes(tmp_path, monkeypatch):
    """A checkpoint is hashed once per version (model/hash_cache.py): the value kept under the files'
    stamp is what other processes get; rewriting the file (same size, its modification time put back)
    changes the stamp, so the new bytes are hashed; a broken cache file is treated as empty."""
    import os
    import subprocess
    import sys

    from batchsd.model import checkpoint, hash_cache

    monkeypatch.setenv(hash_cache.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "c.safetensors"
    write_tiny(path, seed=12)
    first = checkpoint.checkpoint_sha256([path])
    assert first == sha256_of(path)
    kept = json.loads((tmp_path / "cache" / hash_cache.CACHE_FILE).read_text())
    assert list(kept.values()) == [first]
    # another process reads the kept value: planted under this stamp, it is what that process reports
    (tmp_path / "cache" / hash_cache.CACHE_FILE).write_text(json.dumps({k: "f" * 64 for k in kept}))
    code = f"from batchsd.model.checkpoint import checkpoint_sha256; print(checkpoint_sha256([{str(path)!r}]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "f" * 64
    # the same size and modification time, other bytes: hashed again
    st = os.stat(path)
    write_tiny(path, seed=13)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size
    checkpoint._hash_cache.clear()
    assert checkpoint.checkpoint_sha256([path]) == sha256_of(path) != first
    (tmp_path / "cache" / hash_cache.CACHE_FILE).write_text("{not json")
    checkpoint._hash_cache.clear()
    assert checkpoint.checkpoint_sha256([path]) == sha256_of(path)
    monkeypatch.setenv(hash_cache.CACHE_ENV, "off")
    assert hash_cache.cache_path() is None


# ----------------------------------------------------------------------------- diffusers folders, end to end

@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """TINY reference models (diffusers UNet/VAE, transformers CLIP) written as a single file and as folders."""
    pytest.importorskip("diffusers")
    from ref_clip import build_reference_clip
    from ref_unet import build_reference_unet
    from ref_vae import build_reference_vae

    refs = {"unet": build_reference_unet(TINY.unet, 21), "vae": build_reference_vae(TINY.vae, 22),
            "text_encoder": build_reference_clip(TINY.clip, 23)}
    root = tmp_path_factory.mktemp("tiny_reference")
    original = {c: diffusers_to_original(c, m.state_dict()) for c, m in refs.items()}
    single = write_original_checkpoint(root / "tiny.safetensors", original["unet"], original["vae"],
                                       original["text_encoder"], torch.float32)
    folders = {
        "as saved": write_diffusers_folder(root / "plain", refs["unet"], refs["vae"], refs["text_encoder"]),
        "text_model level": write_diffusers_folder(root / "nested", refs["unet"], refs["vae"], refs["text_encoder"],
                                                   text_model_level=True),
        "no text_model level": write_diffusers_folder(root / "flat", refs["unet"], refs["vae"],
                                                      refs["text_encoder"], text_model_level=False),
    }
    return refs, single, folders


def test_diffusers_folders_load_like_the_single_file(tiny_reference):
    refs, single, folders = tiny_reference
    ours, info = load_model(single)
    assert info.config_name == "tiny"
    expected = ours.state_dict()
    with safe_open(str(folders["text_model level"] / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    with safe_open(str(folders["no text_model level"] / "text_encoder" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("text_model.") for k in f.keys())
    for name, folder in folders.items():
        model, info = load_model(folder)
        assert (info.format, info.layout, info.config_name) == ("diffusers", "diffusers", "tiny"), name
        assert_model_equals(model, expected, torch.float32)
        weight_files = sorted(folder.glob("*/*.safetensors"), key=lambda f: str(f.relative_to(folder)))
        assert [f.parent.name for f in weight_files] == ["text_encoder", "unet", "vae"]
        # the identity covers the weight files and the config files read, in path order
        identity = sorted([*weight_files, *(f for f in folder.glob("*/*.json") if f.name in (
            "config.json", "scheduler_config.json"))], key=lambda f: str(f.relative_to(folder)))
        assert info.sha256 == sha256_of(*identity), name


def test_diffusers_fp16_variant_folder(tiny_reference, tmp_path):
    refs, single, _ = tiny_reference
    copies = {c: copy.deepcopy(m) for c, m in refs.items()}  # the writer casts the modules it saves
    folder = write_diffusers_folder(tmp_path / "fp16", copies["unet"], copies["vae"], copies["text_encoder"],
                                    dtype=torch.float16, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    model, info = load_model(folder, dtype=torch.float32)
    assert info.dtype == "float16"
    reference, _ = load_model(single, dtype=torch.float32)
    assert_model_equals(model, {k: v.half() for k, v in reference.state_dict().items()}, torch.float32)


def test_sharded_diffusers_folder(tiny_reference, tmp_path):
    refs, single, _ = tiny_reference
    folder = write_diffusers_folder(tmp_path / "sharded", refs["unet"], refs["vae"], refs["text_encoder"],
                                    max_shard_size="2MB")
    unet_shards = sorted((folder / "unet").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(unet_shards) > 2 and (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model, info = load_model(folder)
    reference, _ = load_model(single)
    assert_model_equals(model, reference.state_dict(), torch.float32)


def test_loaded_model_matches_the_reference_models(tiny_reference):
    """The loaded batchsd model computes what the reference models compute (text encoder and UNet)."""
    refs, single, _ = tiny_reference
    model, _ = load_model(single)
    ids = torch.randint(0, TINY.clip.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_text = model.text_encoder(ids)
        ref_text = refs["text_encoder"](ids).last_hidden_state
        assert (ours_text - ref_text).abs().max() < 1e-4
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([10.0, 500.0])
        ours_eps = model.unet(x, t, ref_text)
        ref_eps = refs["unet"](x, t, encoder_hidden_states=ref_text).sample
        assert (ours_eps - ref_eps).abs().max() < 1e-3 * ref_eps.abs().max()


def test_diffusers_from_single_file_reads_our_file_back(tiny_reference, monkeypatch):
    """diffusers' own single-file loader (original -> diffusers) recovers the reference tensors exactly from
    the file written with diffusers_to_original: an independent check of the writer and the mapping."""
    from diffusers import StableDiffusionPipeline

    refs, single, folders = tiny_reference
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(folders["as saved"]),
                                                    local_files_only=True)
    for component, ref in refs.items():
        got, want = getattr(pipe, component).state_dict(), ref.state_dict()
        assert set(got) == set(want), component
        for key in want:
            assert torch.equal(got[key], want[key]), (component, key)


def test_start_up_imports_stay_lean():
    """Two start-up costs kept out (fresh interpreter): building the model on the meta device runs no
    nn.init (nn.Embedding's normal_ on meta would import torch._dynamo, ~1.2 s), and importing the
    pipeline does not import transformers (~1.2 s; the tokenizer loads it on its own thread). The
    model built so has the same tensors as one built with nn.init, and nn.init works afterwards."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from batchsd.model.checkpoint import build_on_meta\n"
            "from batchsd.model.config import SD15\n"
            "from batchsd.model.stable_diffusion import StableDiffusionModel\n"
            "import batchsd.model.pipeline\n"
            "m = build_on_meta(SD15)\n"
            "print('torch._dynamo' in sys.modules, 'transformers' in sys.modules)\n"
            "with torch.device('meta'):\n"
            "    ref = StableDiffusionModel(SD15)\n"
            "shapes = lambda model: {k: (tuple(v.shape), v.dtype, v.is_meta) for k, v in model.state_dict().items()}\n"
            "print(len(shapes(m)), shapes(m) == shapes(ref))\n"
            "x = torch.zeros(1000); torch.nn.init.normal_(x); print(bool(x.std() > 0.5))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dynamo, transformers, count, same, init_works = out.stdout.split()
    assert (dynamo, transformers) == ("False", "False")
    assert int(count) > 1000 and same == "True" and init_works == "True"


def test_a_folders_scheduler_spacing_is_read_and_unsupported_options_are_refused(tiny_reference, tmp_path):
    """The scheduler config is authoritative: its timestep_spacing reaches every sampler (the
    schedules under each spacing: tests/model/test_samplers.py); an option the samplers do not have
    is refused, not ignored."""
    import json
    import shutil

    refs, single, folders = tiny_reference
    folder = tmp_path / "f"
    shutil.copytree(folders["as saved"], folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    saved = json.loads(config_path.read_text())
    assert saved["timestep_spacing"] == "leading"                 # PNDMScheduler's default, saved with it
    _, info = load_model(folder)
    assert info.model_family.scheduler.timestep_spacing == "leading"
    _, info = load_model(single)
    assert info.model_family.scheduler.timestep_spacing is None   # a single file: each sampler's default
    for spacing in ("trailing", "linspace"):
        config_path.write_text(json.dumps({**saved, "timestep_spacing": spacing}))
        _, info = load_model(folder)
        assert info.model_family.scheduler.timestep_spacing == spacing
    for key, value in (("rescale_betas_zero_snr", True), ("clip_sample", True), ("timestep_spacing", "karras")):
        config_path.write_text(json.dumps({**saved, key: value}))
        with pytest.raises(CheckpointError, match=key):
            load_model(folder)
