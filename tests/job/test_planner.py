"""Planner: img2img size defaulting, per-row init image failures, batch grouping, shards."""
from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import batchsd.job.init_images as planner
from batchsd.errors import InputError
from batchsd.job.manifest import read_manifest
from batchsd.job.rows import JobRow
from batchsd.job.init_images import init_image_size, load_init_image, resolve_image_sizes
from batchsd.job.plan import Batch, batch_key, plan_batches
from batchsd.job.shards import shard_of

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def job(index, width=64, height=64, steps=10, sampler="euler", init=None, strength=None, **kw) -> JobRow:
    fields = dict(index=index, id=f"r{index}", prompt=f"p{index}", negative_prompt="", seed=index, steps=steps,
                  cfg_scale=7.5, sampler=sampler, width=width, height=height, init_image=init,
                  strength=strength if init is None or strength is not None else 0.75, extra={})
    fields.update(kw)
    return JobRow(**fields)


def save_image(path: Path, size=(132, 100), **save_kw) -> str:
    Image.new("RGB", size, (200, 100, 50)).save(path, **save_kw)
    return str(path)


# ----------------------------------------------------------------------------- sizes

def test_img2img_size_from_image_rounded_down(tmp_path):
    img = save_image(tmp_path / "a.png", (132, 100))
    rows = [job(0, None, None, init=img), job(1, 256, None, init=img), job(2, None, 72, init=img),
            job(3, 192, 256, init=img), job(4)]
    resolved, failures = resolve_image_sizes(rows)
    assert failures == {}
    assert [(r.index, r.width, r.height) for r in resolved] == [(0, 128, 96), (1, 256, 96), (2, 128, 72),
                                                                (3, 192, 256), (4, 64, 64)]
    assert resolved[4] is rows[4]                                      # text-to-image rows are kept as they are
    assert resolved[3] == dataclasses.replace(rows[3], init_image_sha256=resolved[3].init_image_sha256)
    assert {r.init_image_sha256 for r in resolved[:4]} == {hashlib.sha256(Path(img).read_bytes()).hexdigest()}


def test_example_img2img_rows_resolve(tmp_path):
    rows, failures = resolve_image_sizes(read_manifest(JOBS / "prompts.parquet").rows)
    assert failures == {}
    assert {(r.width, r.height) for r in rows if r.init_image} == {(128, 96)}


def test_missing_and_corrupt_images_fail_their_rows_only(tmp_path):
    good = save_image(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    (tmp_path / "folder.png").mkdir()
    rows = [job(0, None, None, init=str(tmp_path / "missing.png")), job(1, None, None, init=good),
            job(2, 64, 64, init=str(corrupt)),       # an explicit size does not skip the check
            job(3, None, None, init=str(text)), job(4, None, None, init=str(tmp_path / "folder.png")), job(5)]
    resolved, failures = resolve_image_sizes(rows)
    assert [r.index for r in resolved] == [1, 5]
    assert set(failures) == {0, 2, 3, 4}
    assert "not found" in failures[0] and "missing.png" in failures[0] and "manifest's folder" in failures[0]
    assert "is not an image file PIL can read" in failures[2] and "is not an image file PIL can read" in failures[3]
    assert "BufferedReader" not in failures[2]                       # PIL's message names a file object
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "is empty" in resolve_image_sizes([job(0, None, None, init=str(empty))])[1][0]
    assert "folder" in failures[4]


def test_too_small_or_too_large_after_rounding(tmp_path):
    small = save_image(tmp_path / "small.png", (70, 50))     # 64x48: height under 64
    large = save_image(tmp_path / "large.png", (2060, 80))   # 2056x80: width over 2048
    rows = [job(0, None, None, init=small), job(1, None, 64, init=small), job(2, None, None, init=large),
            job(3, 512, None, init=large)]
    resolved, failures = resolve_image_sizes(rows)
    assert [(r.index, r.width, r.height) for r in resolved] == [(1, 64, 64), (3, 512, 80)]
    assert "70x50" in failures[0] and "64x48" in failures[0] and "set width and height" in failures[0]
    assert "2056x80" in failures[2]


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    img = save_image(tmp_path / "big.png", (300, 300))
    monkeypatch.setattr(planner, "MAX_INIT_IMAGE_PIXELS", 300 * 300 - 1)
    resolved, failures = resolve_image_sizes([job(0, 64, 64, init=img)])
    assert resolved == [] and "too large" in failures[0] and "resize" in failures[0]
    with pytest.raises(InputError, match="too large"):
        load_init_image(img)
    # PIL's own guard (raised while reading the header) is turned into the same per-row failure
    monkeypatch.setattr(planner, "MAX_INIT_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    resolved, failures = resolve_image_sizes([job(0, 64, 64, init=img)])
    assert resolved == [] and "too large to decode safely" in failures[0]


def test_truncated_image_reads_header_but_fails_to_load(tmp_path):
    path = tmp_path / "cut.png"
    Image.effect_noise((128, 128), 64).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert init_image_size(str(path)) == (128, 128)
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_init_image(str(path))


def test_load_init_image_rgb_and_exif_orientation(tmp_path):
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (80, 64), (1, 2, 3, 128)).save(rgba)
    loaded = load_init_image(str(rgba))
    assert loaded.mode == "RGB" and loaded.size == (80, 64)
    # a phone photo stored landscape with "rotate 90" in EXIF is used upright, as diffusers' load_image does
    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 80), (9, 9, 9)).save(photo, exif=exif)
    assert init_image_size(str(photo)) == (80, 120)
    assert load_init_image(str(photo)).size == (80, 120)
    (row,), _ = resolve_image_sizes([job(0, None, None, init=str(photo))])
    assert (row.width, row.height) == (80, 120)


def test_each_path_opened_once(tmp_path, monkeypatch):
    img = save_image(tmp_path / "a.png")
    calls = Counter()
    real = planner.inspect_init_image

    def counting(path):
        calls[path] += 1
        return real(path)
    monkeypatch.setattr(planner, "inspect_init_image", counting)
    missing = str(tmp_path / "missing.png")
    rows = [job(i, None, None, init=img if i % 2 else missing) for i in range(10)]
    resolved, failures = resolve_image_sizes(rows)
    assert len(resolved) == 5 and len(failures) == 5 and calls == {img: 1, missing: 1}


# ----------------------------------------------------------------------------- batches

def test_grouping_ignores_file_order_and_varying_fields():
    rows = [job(0, 64, 64), job(1, 128, 64), job(2, 64, 64, cfg_scale=3.0, negative_prompt="n", seed=99),
            job(3, 64, 64, steps=20), job(4, 128, 64), job(5, 64, 64, sampler="ddim"), job(6, 64, 64)]
    batches = plan_batches(rows, batch_size=8)
    assert [[r.index for r in b.rows] for b in batches] == [[0, 2, 6], [1, 4], [3], [5]]
    assert [b.key for b in batches] == [(64, 64, 10, "euler", None, 1, (), None), (128, 64, 10, "euler", None, 1, (), None),
                                        (64, 64, 20, "euler", None, 1, (), None), (64, 64, 10, "ddim", None, 1, (), None)]


def test_rows_of_two_models_never_share_a_batch():
    rows = [job(0), dataclasses.replace(job(1), model="/w/a.safetensors"), job(2),
            dataclasses.replace(job(3), model="/w/a.safetensors"), dataclasses.replace(job(4), model="tiny")]
    batches = plan_batches(rows, batch_size=8)
    assert [[r.index for r in b.rows] for b in batches] == [[0, 2], [1, 3], [4]]
    assert [b.key[-1] for b in batches] == [None, "/w/a.safetensors", "tiny"]     # the key ends with the model


def test_batch_size_split_keeps_order():
    rows = [job(i, 64 if i % 3 else 128, 64) for i in range(11)]
    batches = plan_batches(rows, batch_size=3)
    assert [[r.index for r in b.rows] for b in batches] == [[0, 3, 6], [9], [1, 2, 4], [5, 7, 8], [10]]
    assert all(len(b.rows) <= 3 for b in batches)
    assert plan_batches(rows, 3) == batches                       # deterministic
    assert [[r.index for r in b.rows] for b in plan_batches(rows, 1)] == [[0], [3], [6], [9], [1], [2], [4],
                                                                          [5], [7], [8], [10]]
    with pytest.raises(ValueError):
        plan_batches(rows, 0)


def test_img2img_grouped_by_denoising_steps_and_never_mixed_with_txt2img():
    rows = [job(0, steps=12, init="/a.png", strength=0.6),    # int(7.2) = 7
            job(1, steps=12, init="/b.png", strength=0.65),   # int(7.8) = 7: shares with row 0
            job(2, steps=12, init="/a.png", strength=0.7),    # int(8.4) = 8
            job(3, steps=12),                                 # txt2img, 12 steps
            job(4, steps=12, init="/a.png", strength=1.0)]    # img2img running all 12 steps: still apart
    batches = plan_batches(rows, batch_size=4)
    assert [[r.index for r in b.rows] for b in batches] == [[0, 1], [2], [3], [4]]
    assert [b.key[4] for b in batches] == [7, 8, None, 12]
    assert [b.is_img2img for b in batches] == [True, True, False, True]


def test_unresolved_rows_cannot_be_planned():
    with pytest.raises(ValueError, match="resolve_image_sizes"):
        plan_batches([job(0, None, None, init="/a.png")], 4)


def test_batch_key_matches_pipeline(tmp_path):
    pipeline = pytest.importorskip("batchsd.model.pipeline")
    rows, failures = resolve_image_sizes(read_manifest(JOBS / "prompts.csv").rows)
    assert not failures
    image = Image.open(JOBS / "init_landscape.png")
    for row in rows:
        gen = pipeline.GenerationRow(prompt=row.prompt, seed=row.seed, steps=row.steps, sampler=row.sampler,
                                     width=row.width, height=row.height, strength=row.strength or 0.75,
                                     init_image=image if row.init_image else None)
        assert pipeline.Pipeline.batch_key(gen) + (row.model,) == batch_key(row), row.id
        unsized = dataclasses.replace(gen, width=None, height=None)    # the pipeline's own defaulting agrees
        if row.init_image:
            assert pipeline.Pipeline.batch_key(unsized) + (row.model,) == batch_key(row)


def test_batch_is_a_plain_record():
    b = Batch(key=(64, 64, 10, "euler", None), rows=[job(0)])
    assert not b.is_img2img and b.rows[0].index == 0


# ----------------------------------------------------------------------------- shards

def test_shard_of_is_stable_and_spread():
    assert [shard_of(x, 7) for x in ["a", "b", "fox_forest", "00000"]] == [5, 2, 2, 0]   # pinned
    assert all(shard_of(f"{i:05d}", 1) == 0 for i in range(100))
    counts = Counter(shard_of(f"{i:05d}", 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and all(900 < c < 1100 for c in counts.values())
    # independent of the default seed: shard is not just seed % n
    from batchsd.job.rows import seed_from_id
    assert sum(shard_of(f"{i:05d}", 4) == seed_from_id(f"{i:05d}") % 4 for i in range(4000)) < 1200
    with pytest.raises(ValueError):
        shard_of("a", 0)
