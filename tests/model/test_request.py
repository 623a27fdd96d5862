"""The request rules (batchsd.model.request) and sampler names (batchsd.model.sampler_names): the one
home of the limits, defaults, image-to-image step count and batch key that Pipeline and the
manifest share. Both modules stay free of torch and numpy."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
from PIL import Image

from batchsd.errors import InputError
from batchsd.model.request import (DEFAULT_SIZE, MAX_CFG_SCALE, MAX_SIZE, MAX_STEPS, MIN_SIZE, GenerationRow, batch_key,
                                   check_row, img2img_steps, resolve_size, row_batch_key)
from batchsd.model.sampler_names import A1111_NAMES, SAMPLERS, a1111_name, resolve_sampler


def test_light_imports():
    code = ("import sys, batchsd.model.request, batchsd.model.sampler_names, batchsd\n"
            "from batchsd import GenerationRow\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("DDPM", "ddpm"),
        ("DDIM", "ddim"),
        ("Euler", "euler"),
        ("Euler a", "euler_a"),
        ("euler A", "euler_a"),
        ("DPM++ 2M", "dpmpp_2m"),
        ("DPM++ 2M Karras", "dpmpp_2m_karras"),
        ("dpm++ 2m karras", "dpmpp_2m_karras"),
        ("dpm++  2M\tkarras", "dpmpp_2m_karras"),
        ("dpmpp_2m_karras", "dpmpp_2m_karras"),
        (" Euler_A ", "euler_a"),
    ],
)
def test_resolve_sampler(alias, canonical):
    assert resolve_sampler(alias) == canonical


def test_resolve_sampler_rejects_unknown():
    with pytest.raises(InputError, match="DPM\\+\\+ 2M Karras"):
        resolve_sampler("LMS")
    for near_miss in ("euler-a", "dpmpp 2m", "eulera", ""):
        with pytest.raises(ValueError, match="unknown sampler"):
            resolve_sampler(near_miss)


def test_a1111_names_round_trip():
    assert SAMPLERS == ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")
    assert a1111_name("euler_a") == "Euler a" and a1111_name("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert a1111_name("something else") == "something else"
    for canonical in SAMPLERS:
        assert resolve_sampler(a1111_name(canonical)) == canonical == resolve_sampler(canonical)
    assert set(A1111_NAMES) == set(SAMPLERS)


def test_img2img_steps_is_diffusers_get_timesteps():
    for steps in (1, 3, 4, 10, 25):
        for strength in (0.05, 0.3, 0.6, 0.75, 0.99, 1.0):
            assert img2img_steps(steps, strength) == min(int(steps * strength), steps)
    assert img2img_steps(3, 0.6) == 1 and img2img_steps(10, 1.0) == 10


def test_batch_key_and_row_batch_key():
    assert batch_key(64, 96, 20, "euler_a", None) == (64, 96, 20, "euler_a", None, 1, ())
    row = GenerationRow("a", steps=20, sampler="Euler a", width=64, height=96)
    assert row_batch_key(row) == batch_key(64, 96, 20, "euler_a", None)
    unsized = GenerationRow("a", steps=20)
    assert row_batch_key(unsized)[:2] == (DEFAULT_SIZE, DEFAULT_SIZE)
    assert row_batch_key(unsized, default_size=1024)[:2] == (1024, 1024)
    # A1111 syntax: rows of one batch share their text context length (77-token chunks)
    long = "a photo of a cat, " * 30
    assert row_batch_key(GenerationRow(long, prompt_syntax="a1111"))[5] == 3
    assert row_batch_key(GenerationRow("a", negative_prompt=long, prompt_syntax="a1111"))[5] == 3
    assert row_batch_key(GenerationRow(long))[5] == 1      # plain: one window, cut
    init = Image.new("RGB", (100, 77))
    img2img = GenerationRow("a", steps=10, init_image=init, strength=0.55)
    assert resolve_size(img2img) == (96, 72)
    assert row_batch_key(img2img) == (96, 72, 10, "dpmpp_2m_karras", 5, 1, ())


def test_check_row_limits():
    check_row(GenerationRow("a", cfg_scale=MAX_CFG_SCALE, steps=MAX_STEPS, width=MIN_SIZE, height=MAX_SIZE))
    check_row(GenerationRow("a", cfg_scale=0.0, seed=2**63 - 1))
    for cfg in (MAX_CFG_SCALE + 0.5, 1e30, math.inf, math.nan, -1.0):
        with pytest.raises(InputError, match=r"row 3, cfg_scale: .* must be a finite number in 0\.\.100"):
            check_row(GenerationRow("a", cfg_scale=cfg), position=3)
    with pytest.raises(InputError, match=r"seed: .* \[0, 2\*\*63\)"):
        check_row(GenerationRow("a", seed=2**63))
    with pytest.raises(InputError, match=r"steps: .* 1\.\.999"):
        check_row(GenerationRow("a", steps=MAX_STEPS + 1))
    with pytest.raises(InputError, match=r"width: 60 must be a multiple of 8 in 64\.\.2048"):
        check_row(GenerationRow("a", width=60))
    with pytest.raises(InputError, match="sampler"):
        check_row(GenerationRow("a", sampler="LMS"))
    init = Image.new("RGB", (64, 64))
    with pytest.raises(InputError, match="leaves 0 denoising steps"):
        check_row(GenerationRow("a", steps=3, init_image=init, strength=0.2))
    with pytest.raises(InputError, match=r"strength: 1\.5 must be a number in \(0, 1\]"):
        check_row(GenerationRow("a", init_image=init, strength=1.5))


@pytest.mark.parametrize("fields, message", [
    (dict(seed=True), r"seed: True is not an integer"),
    (dict(steps=True), r"steps: True is not an integer"),
    (dict(cfg_scale=None), r"cfg_scale: None must be a finite number"),
    (dict(cfg_scale="7.5"), r"cfg_scale: '7\.5' must be a finite number"),
    (dict(width=0), r"width: 0 must be a multiple of 8"),               # 0 is not "not given"
    (dict(width="64"), r"width: '64' must be a whole number"),
    (dict(height=64.0), r"height: 64\.0 must be a whole number"),
    (dict(loras=None), r"loras: None must be a tuple of \(path, multiplier\) pairs"),
    (dict(loras="x.safetensors"), r"loras: 'x\.safetensors' must be a tuple"),
    (dict(loras=(("x.safetensors",),)), r"loras: \('x\.safetensors',\) is not a \(path, multiplier\) pair"),
    (dict(loras=(("x.safetensors", math.nan),)), r"loras: the multiplier nan of x\.safetensors must be a finite "
                                                   r"number between -100 and 100"),
    (dict(loras=(("x.safetensors", 1e6),)), r"loras: the multiplier 1000000\.0 .* between -100 and 100"),
    (dict(embeddings="foo.pt"), r"embeddings: 'foo\.pt' must be a tuple of embedding file paths"),
    (dict(init_image="in.png"), r"init_image: a str is not a PIL image"),
    (dict(init_image=Image.new("F", (64, 64))), r"init_image: the image has 32-bit float pixels"),
    (dict(init_image=Image.new("I", (64, 64))), r"init_image: the image has 32-bit integer pixels"),
    (dict(init_image=Image.new("RGB", (0, 64)), width=64, height=64), r"init_image: the image is 0x64: it has no pixels"),
    (dict(init_image=Image.new("RGB", (5000, 64))), r"width: 5000 must be .* \(the init image's size, 5000x64, "
                                                    r"rounded down; pass width and height to resize it\)"),
    (dict(init_image=Image.new("RGB", (64, 64)), strength="0.5"), r"strength: '0\.5' must be a number"),
])
def test_check_row_names_the_field_for_values_of_the_wrong_type(fields, message):
    """Wrong types are InputErrors naming the field, never a TypeError from deep inside torch or PIL."""
    with pytest.raises(InputError, match=r"row 2, " + message):
        check_row(GenerationRow("a", **fields), position=2)
    with pytest.raises(InputError, match="not a GenerationRow"):
        check_row("a prompt")


def test_numpy_numbers_are_numbers():
    np = pytest.importorskip("numpy")
    from batchsd.model.request import plain_numbers

    row = GenerationRow("a", seed=np.int64(5), steps=np.int32(20), cfg_scale=np.float32(7.5), width=np.int64(64),
                        height=64, loras=(("x.safetensors", np.float64(0.5)),))
    check_row(row)
    plain = plain_numbers(row)
    assert (plain.seed, plain.steps, plain.cfg_scale, plain.width, plain.loras) == (5, 20, 7.5, 64, (("x.safetensors", 0.5),))
    assert type(plain.seed) is int and type(plain.cfg_scale) is float and type(plain.loras[0][1]) is float
    sdxl_fields = dict(clip_skip=np.int64(2), original_width=np.int32(1024), original_height=np.uint16(768),
                       crop_top=np.int64(0), crop_left=np.int8(16))
    plain = plain_numbers(GenerationRow("a", **sdxl_fields))
    check_row(GenerationRow("a", **sdxl_fields))
    assert (plain.clip_skip, plain.original_width, plain.original_height, plain.crop_top, plain.crop_left) == \
        (2, 1024, 768, 0, 16) and type(plain.clip_skip) is int and type(plain.crop_left) is int
    with pytest.raises(InputError, match="clip_skip"):
        check_row(GenerationRow("a", clip_skip=np.float64(2.0)))
