"""Hardening of the output folder and the run's edges, each through the real CLI on real folders:
another manifest's job in --out, links inside --out, a folder where an image goes, --out that
cannot be written, an empty --shard, NaN output, a closed stdout, `status` beside a live run and
with hand-edited metadata."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from batchsd.job.layout import RunLayout
from batchsd.job.lock import out_dir_lock
from batchsd.job.options import RunOptions
from batchsd.job.run import run
from cli_support import invoke

REPO = Path(__file__).resolve().parents[2]
HEADER = "id,prompt,negative_prompt,seed,steps,cfg_scale,sampler,width,height,init_image,strength"


pytestmark = pytest.mark.usefixtures("cached_tiny")   # tests/job/conftest.py


def write_csv(path: Path, n: int = 3, prefix: str = "r") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{prefix}{i},prompt {i},,{i},1,7.5,euler,64,64,," for i in range(n)]
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def test_same_named_manifests_do_not_share_the_default_out(tmp_path):
    a = write_csv(tmp_path / "jobA" / "prompts.csv", prefix="a")
    b = write_csv(tmp_path / "jobB" / "prompts.csv", prefix="a")      # same ids, other job
    assert invoke("run", str(a), "--model", "tiny").exit_code == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "outputs/prompts/images").iterdir()}
    before = pd.read_parquet(tmp_path / "outputs/prompts/results.parquet")
    r = invoke("run", str(b), "--model", "tiny")
    assert r.exit_code == 2
    assert str(a.resolve()) in r.output and str(b.resolve()) in r.output and "--out" in r.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "outputs/prompts/images").iterdir()} == first
    assert pd.read_parquet(tmp_path / "outputs/prompts/results.parquet").equals(before)
    # told to: --reuse-out
    assert invoke("run", str(b), "--model", "tiny", "--reuse-out").exit_code == 0


def test_a_link_at_an_image_path_is_replaced_not_followed(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", 2)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not ours")
    (out / "images" / "r0.png").symlink_to(out / "images" / "r1.png")   # another row's file
    (out / "images" / "r1.png").symlink_to(outside)                       # a file outside --out
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert outside.read_bytes() == b"not ours"
    df = pd.read_parquet(out / "results.parquet").set_index("id")
    import hashlib
    for rid in ("r0", "r1"):
        path = out / "images" / f"{rid}.png"
        assert not path.is_symlink() and path.is_file()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == df.loc[rid, "image_sha256"]
    assert df.loc["r0", "image_sha256"] != df.loc["r1", "image_sha256"]


def test_linked_images_folder_is_refused(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", 1)
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "images").symlink_to(elsewhere)
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 2 and "is a link" in r.output and "--out" in r.output
    assert list(elsewhere.iterdir()) == []


def test_a_folder_where_an_image_goes_fails_that_row_only(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", 3)
    out = tmp_path / "out"
    (out / "images" / "r1.png").mkdir(parents=True)
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 1, r.output
    df = pd.read_parquet(out / "results.parquet").set_index("id")
    assert list(df["status"]) == ["ok", "error", "ok"]
    assert "is a folder" in df.loc["r1", "error"]


def test_out_that_is_a_file_or_read_only(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", 1)
    (tmp_path / "afile").write_text("x")
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(tmp_path / "afile"))
    assert r.exit_code == 2 and "is a file, not a folder" in r.output and "nothing was run" in r.output
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(ro / "out"))
    assert r.exit_code == 2 and "nothing was run" in r.output


def test_out_on_a_read_only_mount_is_exit_2(tmp_path, monkeypatch):
    """Root ignores permission bits, so a read-only filesystem is stood in for by its errno."""
    import errno

    import batchsd.job.lock as lock

    manifest = write_csv(tmp_path / "m.csv", 1)
    real_open = os.open

    def read_only(path, flags, *a):
        if str(path).endswith("lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(lock.os, "open", read_only)
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(tmp_path / "out"))
    assert r.exit_code == 2 and "Read-only file system" in r.output and "nothing was run" in r.output


def test_empty_shard_is_an_error(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", 1)
    r = invoke("run", str(manifest), "--model", "tiny", "--shard", "")
    assert r.exit_code == 2 and "empty" in r.output
    assert not (tmp_path / "outputs").exists()


def test_nan_rows_fail_alone(tmp_path, tiny_pipe, monkeypatch):
    manifest = write_csv(tmp_path / "m.csv", 3)
    real = type(tiny_pipe).generate

    def one_row_nan(self, rows):
        out = real(self, rows)
        out.latents = out.latents.clone()
        for i, row in enumerate(rows):
            if row.prompt == "prompt 1":
                out.latents[i] = float("nan")
        return out

    monkeypatch.setattr(type(tiny_pipe), "generate", one_row_nan)
    summary = run(RunOptions(manifest=manifest, out_dir=tmp_path / "out", batch_size=3), pipe=tiny_pipe)
    assert summary.exit_code == 1 and (summary.ok, summary.failed) == (2, 1)
    df = pd.read_parquet(tmp_path / "out/results.parquet").set_index("id")
    assert list(df["status"]) == ["ok", "error", "ok"] and "NaN" in df.loc["r1", "error"]
    assert not (tmp_path / "out/images/r1.png").exists()
    assert summary.batch_size == 3 and "1 batch(es)" not in ""   # one generate call made all three


def test_nan_weights_fail_every_row_with_a_reason(tmp_path):
    from batchsd.model.pipeline import Pipeline

    pipe = Pipeline.load("tiny", device="cpu", dtype="bf16")   # its own model, not the module's shared fp32 one
    with torch.no_grad():
        next(pipe.unet.parameters()).fill_(float("nan"))
    manifest = write_csv(tmp_path / "m.csv", 2)
    summary = run(RunOptions(manifest=manifest, out_dir=tmp_path / "out"), pipe=pipe)
    assert summary.exit_code == 1 and summary.ok == 0
    df = pd.read_parquet(tmp_path / "out/results.parquet")
    assert (df["status"] == "error").all() and df["error"].str.contains("NaN").all()


def test_closed_stdout_keeps_exit_0(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", 1)
    r, w = os.pipe()
    os.close(r)                                   # nobody reads: writing raises EPIPE
    proc = subprocess.run([sys.executable, "-m", "batchsd.cli", "run", str(manifest), "--model", "tiny",
                           "--out", str(tmp_path / "out")], stdout=w, stderr=subprocess.PIPE, cwd=tmp_path,
                          timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(w)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert (tmp_path / "out/summary.json").is_file()


def test_status_sees_a_live_run_and_survives_hand_edited_metadata(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", 2)
    out = tmp_path / "out"
    assert invoke("run", str(manifest), "--model", "tiny", "--out", str(out)).exit_code == 0
    (out / "images" / "r1.png").unlink()                  # one row to make again
    with out_dir_lock(out, RunLayout(out).lock_path):     # a run in progress holds the lock
        r = invoke("status", str(out))
    assert r.exit_code == 3 and "in progress" in r.output and "run the same command again" not in r.output
    meta = RunLayout(out).meta_path
    for edited in ('[1, 2]', '{"manifest": 5, "limit": "x"}', '{"limit": null}', 'not json'):
        meta.write_text(edited)
        r = invoke("status", str(out))
        assert r.exit_code == 2 and "--manifest" in r.output, (edited, r.output)
    r = invoke("status", str(out), "--manifest", str(manifest))
    assert r.exit_code == 3 and "1 ok" in r.output
    meta.write_text(json.dumps({"manifest": str(manifest), "limit": "one"}))
    assert invoke("status", str(out)).exit_code == 3
