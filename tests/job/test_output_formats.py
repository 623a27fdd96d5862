"""--format webdataset|parquet|imagefolder|files and --image-format, read back by the real consumers:
the `webdataset` package, `datasets.load_dataset` (webdataset, parquet, imagefolder), open_clip's
sizes.json reader, piexif (A1111's EXIF reader). Resume of dataset shards (kill -9, a retried row,
a lost done marker) gives the same bytes as an uninterrupted run; process shards own their files.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchsd.job.png_metadata import a1111_parameters
from cli_support import invoke

wds = pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]
HEADER = "id,prompt,negative_prompt,seed,steps,cfg_scale,sampler,width,height,init_image,strength"


@pytest.fixture(autouse=True)
def offline_datasets(cached_tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write_manifest(path: Path, n: int, *, failing: tuple[int, ...] = ()) -> Path:
    """n rows; the rows in `failing` are img2img rows whose init image is missing (they fail alone)."""
    rows = []
    for i in range(n):
        init = f"missing-{i}.png,0.5" if i in failing else ","
        rows.append(f"r{i:02d},a photo number {i},,{100 + i},2,7.5,euler,64,64,{init}")
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def run(manifest: Path, out: Path, *args: str, code: int = 0):
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--batch-size", "1", *args)
    assert r.exit_code == code, r.output
    return r


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def open_clip_dataset_size():
    """open_clip's own `get_dataset_size` (open_clip_train/data.py), taken from the installed file:
    importing the module needs torchvision, which the test environment does not have."""
    spec = pytest.importorskip("open_clip_train").__spec__
    source = Path(spec.submodule_search_locations[0], "data.py").read_text()
    tree = ast.parse(source)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("expand_urls", "get_dataset_size")]
    assert len(funcs) == 2
    namespace: dict = {}
    import braceexpand

    exec("import ast, json, os\n", namespace)
    namespace.update(braceexpand=braceexpand, wds=wds)
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "open_clip_train/data.py", "exec"), namespace)
    return namespace["get_dataset_size"]


# ----------------------------------------------------------------------------- webdataset

def test_webdataset_read_by_webdataset_datasets_and_open_clip(tmp_path):
    manifest = write_manifest(tmp_path / "jobs.csv", 7, failing=(4,))
    out = tmp_path / "out"
    run(manifest, out, "--format", "webdataset", "--shard-size", "3", code=1)   # row r04 fails
    folder = out / "webdataset"
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json",
        "00002.parquet", "00002.tar", "00002_stats.json", "sizes.json"]
    assert json.loads((folder / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 2, "00002.tar": 1}
    stats = json.loads((folder / "00001_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed"]) == (3, 2, 1)
    # per-shard parquet: every row of the shard, the failure too
    shard1 = pq.read_table(folder / "00001.parquet").to_pylist()
    assert [(r["key"], r["status"]) for r in shard1] == [("r03", "ok"), ("r04", "error"), ("r05", "ok")]
    # reproducible members: fixed mtime, owner and mode; a sample's members together, in name order
    with tarfile.open(folder / "00000.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [f"r0{k}.{ext}" for k in range(3) for ext in ("json", "png", "txt")]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}
    # results name the tar; the staged images are gone
    results = pq.read_table(out / "results.parquet").to_pylist()
    by_id = {r["id"]: r for r in results}
    assert by_id["r05"]["image_path"] == "webdataset/00001.tar" and by_id["r04"]["status"] == "error"
    assert not any((out / ".batchsd" / "staging").iterdir())

    # the webdataset package
    urls = [str(folder / f"{k:05d}.tar") for k in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == ["r00", "r01", "r02", "r03", "r05", "r06"]
    for s in samples:
        rec = by_id[s["__key__"]]
        assert s["txt"] == rec["prompt"] and s["json"]["id"] == rec["id"] and s["json"]["seed"] == rec["seed"]
        assert s["png"].size == (64, 64)
    raw = next(iter(wds.WebDataset(urls[:1], shardshuffle=False)))
    assert hashlib.sha256(raw["png"]).hexdigest() == by_id["r00"]["image_sha256"]

    # datasets.load_dataset("webdataset")
    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 6 and ds[0]["png"].size == (64, 64) and ds[5]["txt"] == by_id["r06"]["prompt"]

    # open_clip: the sample count of a brace-expanded shard list from sizes.json
    get_dataset_size = open_clip_dataset_size()
    assert get_dataset_size(str(folder / "{00000..00002}.tar")) == (6, 3)
    assert get_dataset_size(str(folder / "{00001..00002}.tar")) == (3, 2)


def test_webdataset_key_escapes_dots_and_keeps_samples_whole(tmp_path):
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"{HEADER}\nv1.5,a,,1,2,7.5,euler,64,64,,\nv1_5,b,,2,2,7.5,euler,64,64,,\n")
    out = tmp_path / "out"
    run(manifest, out, "--format", "webdataset")
    samples = list(wds.WebDataset([str(out / "webdataset" / "00000.tar")], shardshuffle=False))
    assert [(s["__key__"], s["txt"]) for s in samples] == [("v1%2E5", b"a"), ("v1_5", b"b")]


# ----------------------------------------------------------------------------- parquet and imagefolder

def test_parquet_read_by_datasets_with_images(tmp_path):
    manifest = write_manifest(tmp_path / "jobs.csv", 5, failing=(1,))
    out = tmp_path / "out"
    run(manifest, out, "--format", "parquet", "--shard-size", "2", code=1)
    names = sorted(p.name for p in (out / "data").iterdir())
    assert names == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    ds = datasets.load_dataset("parquet", data_files={"train": str(out / "data" / "train-*.parquet")}, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds["id"] == ["r00", "r02", "r03", "r04"]           # failures only in results.parquet
    first = ds[0]
    assert first["image"].size == (64, 64) and first["text"] == "a photo number 0" and first["seed"] == 100
    results = {r["id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert results["r03"]["image_path"] == "data/train-00001-of-00003.parquet"
    raw = pq.read_table(out / "data" / "train-00000-of-00003.parquet").column("image").to_pylist()[0]
    assert raw["path"] == "r00.png" and hashlib.sha256(raw["bytes"]).hexdigest() == results["r00"]["image_sha256"]


def test_imagefolder_read_by_datasets(tmp_path):
    manifest = write_manifest(tmp_path / "jobs.csv", 4)
    out = tmp_path / "out"
    run(manifest, out, "--format", "imagefolder", "--image-format", "jpg")
    lines = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [(d["file_name"], d["text"]) for d in lines] == [(f"r0{i}.jpg", f"a photo number {i}") for i in range(4)]
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 4 and sorted(ds["text"]) == [f"a photo number {i}" for i in range(4)]
    assert ds[0]["image"].size == (64, 64) and ds[0]["image"].format == "JPEG"


# ----------------------------------------------------------------------------- files, image formats

def exif_parameters(data: bytes) -> str:
    """The A1111 parameters as A1111 reads a jpg/webp: piexif on the EXIF block, UserComment."""
    piexif = pytest.importorskip("piexif")
    import piexif.helper

    with Image.open(io.BytesIO(data)) as im:
        exif = piexif.load(im.info["exif"])
    return piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])


@pytest.mark.parametrize("image_format", ["jpg", "webp"])
def test_files_jpg_webp_carry_a1111_parameters_and_captions(tmp_path, image_format):
    manifest = write_manifest(tmp_path / "jobs.csv", 2)
    sizes = {}
    for quality in ("30", "95"):
        out = tmp_path / f"out-{quality}"
        run(manifest, out, "--image-format", image_format, "--quality", quality, "--captions")
        rec = pq.read_table(out / "results.parquet").to_pylist()[0]
        data = (out / rec["image_path"]).read_bytes()
        assert rec["image_path"] == f"images/r00.{image_format}"
        assert hashlib.sha256(data).hexdigest() == rec["image_sha256"]
        assert exif_parameters(data) == a1111_parameters(rec)
        assert (out / "images" / "r00.txt").read_text() == "a photo number 0"
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (64, 64)
        sizes[quality] = len(data)
    assert sizes["30"] < sizes["95"]


def test_jpg_row_whose_parameters_overflow_the_exif_block_fails_alone(tmp_path):
    """A JPEG's EXIF block is one 64 KB marker segment: a ~70,000-character prompt does not fit. That
    row fails with the fix in its error; the rows around it are made (the run is not aborted)."""
    manifest = write_manifest(tmp_path / "jobs.csv", 3)
    lines = manifest.read_text().splitlines()
    lines[2] = lines[2].replace("a photo number 1", "x" * 70_000)
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run(manifest, out, "--image-format", "jpg", code=1)
    recs = {r["id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert [recs[i]["status"] for i in ("r00", "r01", "r02")] == ["ok", "error", "ok"]
    assert "EXIF" in recs["r01"]["error"] and "--image-format png or webp" in recs["r01"]["error"]
    assert not (out / "images" / "r01.jpg").exists()
    run(manifest, tmp_path / "webp", "--image-format", "webp")   # WebP's EXIF chunk has room for it


def test_default_quality_is_95_for_jpg_and_90_for_webp():
    from batchsd.job.outputs.encode import encode_image
    from batchsd.job.outputs.spec import OutputSpec

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    rec = dict(prompt="p", negative_prompt="", steps=2, sampler="euler", cfg_scale=7.5, seed=1, width=32, height=32)
    for image_format, default, other in (("jpg", 95, 90), ("webp", 90, 95)):
        encode = lambda q: encode_image(image, rec, OutputSpec(image_format=image_format, quality=q))  # noqa: E731
        assert encode(None) == encode(default) != encode(other)


def test_bad_output_options_are_refused_before_running(tmp_path):
    manifest = write_manifest(tmp_path / "jobs.csv", 2)
    out = tmp_path / "out"
    r = run(manifest, out, "--quality", "80", code=2)
    assert "PNG is lossless" in r.output
    r = run(manifest, out, "--format", "imagefolder", "--captions", code=2)
    assert "drop --captions" in r.output
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--engine", "ray", "--format", "parquet")
    assert r.exit_code == 2 and "--engine ray writes --format files" in r.output
    assert not out.exists()
    # one --out, one output format; a shard format's rows are fixed by its first run
    run(manifest, out, "--format", "webdataset")
    r = run(manifest, out, "--format", "parquet", code=2)
    assert "One --out holds one output format" in r.output
    r = run(manifest, out, "--format", "webdataset", "--limit", "1", code=2)
    assert "A dataset shard holds fixed rows" in r.output
    named = tmp_path / "named.csv"          # a pass-through column named like a column the format adds
    named.write_text(manifest.read_text().replace("strength\n", "strength,text\n", 1).replace(",\n", ",,t\n"))
    r = run(named, tmp_path / "named", "--format", "parquet", code=2)
    assert "column 'text' has the name of a column --format parquet writes itself" in r.output
    run(named, tmp_path / "named", "--format", "webdataset")
    legacy = tmp_path / "legacy"
    run(manifest, legacy)
    (legacy / ".batchsd" / "output.json").unlink()          # a folder from before formats existed
    r = run(manifest, legacy, "--format", "webdataset", code=2)
    assert "--format files --image-format png" in r.output


# ----------------------------------------------------------------------------- resume

def test_retried_row_and_lost_marker_rewrite_the_same_shard_bytes(tmp_path):
    """A shard written with a failed row is written again when the row is made (its other rows'
    images come back out of the tar); a shard whose done marker was lost is written again. Both
    end byte for byte as a run that never failed."""
    manifest = write_manifest(tmp_path / "jobs.csv", 5, failing=(1,))
    out = tmp_path / "out"
    run(manifest, out, "--format", "webdataset", "--shard-size", "3", code=1)
    assert json.loads((out / "webdataset" / "sizes.json").read_text())["00000.tar"] == 2

    ok_manifest = write_manifest(tmp_path / "ok.csv", 5)
    ref = tmp_path / "ref"
    run(ok_manifest, ref, "--format", "webdataset", "--shard-size", "3")
    # the same job with the failing row fixed: only r01 is made; shard 0 is written again
    r = run(ok_manifest, out, "--format", "webdataset", "--shard-size", "3", "--reuse-out")
    assert "1 ok" in r.stdout and "4 skipped" in r.stdout
    assert files_under(out / "webdataset") == files_under(ref / "webdataset")

    (out / "webdataset" / "00001_stats.json").unlink()
    r = run(ok_manifest, out, "--format", "webdataset", "--shard-size", "3", "--reuse-out")
    assert "5 skipped" in r.stdout
    assert files_under(out / "webdataset") == files_under(ref / "webdataset")


def subprocess_run(manifest: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("BATCHSD_MODEL", None)
    return subprocess.Popen([sys.executable, "-m", "batchsd.cli", "run", str(manifest), "--model", "tiny",
                             "--out", str(out), "--batch-size", "1", *extra], cwd=manifest.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill9_during_webdataset_run_then_resume_gives_the_same_tar_bytes(tmp_path):
    manifest = write_manifest(tmp_path / "jobs.csv", 12)
    fmt = ("--format", "webdataset", "--shard-size", "4")
    ref = tmp_path / "ref"
    proc = subprocess_run(manifest, ref, *fmt)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]

    out = tmp_path / "out"
    proc = subprocess_run(manifest, out, *fmt)
    marker = out / "webdataset" / "00000_stats.json"
    staging = out / ".batchsd" / "staging"
    deadline = time.monotonic() + 240
    # kill once shard 0 is written and a row of shard 1 waits in staging
    while not (marker.exists() and staging.is_dir() and any(staging.glob("*.png"))):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # nothing partial is visible: every tar there is whole, and shards not done have no marker or tar
    tars = sorted((out / "webdataset").glob("*.tar"))
    assert 1 <= len(tars) < 3
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            assert len(tar.getmembers()) == 12
    staged = list((out / ".batchsd" / "staging").glob("*.png"))
    assert staged, "the kill came after the last row: nothing was left to resume"

    proc = subprocess_run(manifest, out, *fmt)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert files_under(out / "webdataset") == files_under(ref / "webdataset")
    assert not list((out / ".batchsd" / "staging").iterdir())


# ----------------------------------------------------------------------------- process shards

@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "imagefolder"])
def test_process_shards_write_their_own_dataset_files(tmp_path, fmt):
    manifest = write_manifest(tmp_path / "jobs.csv", 10)
    out = tmp_path / "out"
    size = ("--shard-size", "2") if fmt != "imagefolder" else ()
    before = set()
    owners = {}
    for index in (0, 1):
        run(manifest, out, "--format", fmt, *size, "--shard", f"{index}/2")
        now = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".batchsd" not in p.parts}
        owners[index] = now - before
        before = now
    label = lambda i: f"{i:05d}-of-00002"   # noqa: E731
    if fmt == "webdataset":
        for i in (0, 1):
            mine = {p for p in owners[i] if p.startswith("webdataset/")} - {"webdataset/sizes.json"}
            assert mine and all(Path(p).name.startswith(label(i) + "-") for p in mine), mine
        sizes = json.loads((out / "webdataset" / "sizes.json").read_text())   # the merge, after shard 1
        assert sum(sizes.values()) == 10 and all(name.endswith(".tar") for name in sizes)
        samples = list(wds.WebDataset([str(out / "webdataset" / n) for n in sorted(sizes)], shardshuffle=False))
        assert sorted(s["__key__"] for s in samples) == [f"r{i:02d}" for i in range(10)]
    elif fmt == "parquet":
        for i in (0, 1):
            assert all(Path(p).name.startswith(f"train-{label(i)}-") for p in owners[i] if p.startswith("data/"))
        ds = datasets.load_dataset("parquet", data_files={"train": str(out / "data" / "*.parquet")}, split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
        assert sorted(ds["id"]) == [f"r{i:02d}" for i in range(10)]
    else:
        for i in (0, 1):
            assert all(p.startswith(f"train/{label(i)}/") for p in owners[i] if p.startswith("train/"))
        ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
        assert sorted(ds["id"]) == [f"r{i:02d}" for i in range(10)]

    r = invoke("status", str(out), "--json")
    report = json.loads(r.stdout)
    assert r.exit_code == 0 and report["output_format"] == fmt
    if fmt != "imagefolder":
        for shard in report["shards"]:
            assert shard["dataset_shards"] == shard["dataset_shards_written"] == -(-shard["rows"] // 2)
        assert "dataset shards" in invoke("status", str(out)).stdout
    # the unsharded run may not add its own dataset files to a process-sharded folder
    r = run(manifest, out, "--format", fmt, *size, code=2)
    assert "per process shard" in r.output
