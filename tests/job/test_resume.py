"""Resume and safety: kill -9 at several points, SIGTERM, changed params, --retry-errors, --overwrite.

Runs that must die are subprocesses (`python -m batchsd.cli`); the others go through the typer
app in-process with the tiny pipeline loaded once (real model, sampler and VAE).
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchsd.job.atomic import atomic_write_table
from batchsd.job.layout import RunLayout
from batchsd.job.journal import PriorRecord, read_prior
from batchsd.job.resume import ModelIdentity, RowModels, decide
from batchsd.job.options import EXIT_SIGINT, EXIT_SIGTERM, RunSummary
from cli_support import invoke

REPO = Path(__file__).resolve().parents[2]
HEADER = "id,prompt,negative_prompt,seed,steps,cfg_scale,sampler,width,height,init_image,strength"


pytestmark = pytest.mark.usefixtures("cached_tiny")   # tests/job/conftest.py


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def rows_for(n: int, sampler: str = "euler_a") -> list[str]:
    return [f"r{i:02d},prompt number {i % 3},,{100 + i},2,7.5,{sampler},64,64,," for i in range(n)]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def results_df(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").set_index("id")


def check_consistent(out: Path) -> set[str]:
    """The invariants that must hold whenever a run died: every visible image is a whole PNG, every
    journaled ok row's image is in place with the recorded hash, results.parquet (if any) is whole
    and names only images that exist. Returns the ids the journal says are done."""
    for p in (out / "images").glob("*.png"):
        with Image.open(p) as im:
            im.verify()
    prior = read_prior(out)
    done = {rid for rid, rec in prior.items() if rec.status == "ok"}
    for rid in done:
        assert (out / prior[rid].image_path).is_file()
    if (out / "results.parquet").exists():
        df = pd.read_parquet(out / "results.parquet")
        for _, row in df[df["status"] == "ok"].iterrows():
            data = (out / row["image_path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
    return done


def start_run(manifest: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("BATCHSD_MODEL", None)
    return subprocess.Popen([sys.executable, "-m", "batchsd.cli", "run", str(manifest), "--model", "tiny",
                             "--out", str(out), *extra], cwd=manifest.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_images(proc: subprocess.Popen, out: Path, n: int, timeout: float = 240.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = len(list((out / "images").glob("*.png"))) if (out / "images").is_dir() else 0
        if count >= n:
            return count
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {n} images after {timeout}s")


# ----------------------------------------------------------------------------- kill -9

def test_sigkill_at_several_points_then_resume_equals_uninterrupted_run(tmp_path):
    n = 8
    manifest = write_csv(tmp_path / "jobs.csv", rows_for(n))
    ref = tmp_path / "ref"
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(ref), "--batch-size", "4")
    assert r.exit_code == 0, r.output

    out = tmp_path / "out"
    kills = []
    for at_least in (1, 5):
        proc = start_run(manifest, out, "--batch-size", "2")
        kills.append(wait_for_images(proc, out, at_least))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        done = check_consistent(out)
    assert 0 < len(done) < n, (kills, done)
    assert not (out / "summary.json").exists()
    made_before = {rid: rec for rid, rec in read_prior(out).items() if rec.status == "ok"}

    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--batch-size", "3")
    assert r.exit_code == 0, r.output
    assert f"{len(done)} skipped" in r.stdout and f"{n - len(done)} ok" in r.stdout

    df, ref_df = results_df(out), results_df(ref)
    assert list(df.index) == [f"r{i:02d}" for i in range(n)] and (df["status"] == "ok").all()
    for rid in made_before:  # nothing done twice: rows finished before the kill kept their records
        assert df.loc[rid, "params_hash"] == made_before[rid].params_hash
    prior_after = read_prior(out)
    assert all(prior_after[rid].image_path == made_before[rid].image_path for rid in made_before)
    for rid in df.index:  # images equal those of the uninterrupted run (batches of 4 there, 2 and 3 here)
        a, b = out / df.loc[rid, "image_path"], ref / ref_df.loc[rid, "image_path"]
        assert np.abs(pixels(a) - pixels(b)).max() <= 1, rid
    assert not list(out.rglob("*.tmp")) and (out / "summary.json").exists()
    assert len(list((RunLayout(out).parts_dir).glob("part-*.parquet"))) == 1


def test_crash_windows_are_repaired(tmp_path):
    """The states a kill can leave, built by hand: an image without a record (killed between the
    image's rename and the part's), stale temp files, a results.parquet behind the journal."""
    manifest = write_csv(tmp_path / "jobs.csv", rows_for(6, sampler="euler"))
    out = tmp_path / "out"
    assert invoke("run", str(manifest), "--model", "tiny", "--out", str(out)).exit_code == 0
    reference = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    finished = results_df(out)["finished_at"]

    # journal without r01 and r04; r04's image is garbage (as if from other params), r01's is right
    (part,) = (RunLayout(out).parts_dir).glob("part-*.parquet")
    t = pq.read_table(part)
    keep = [i for i, rid in enumerate(t.column("id").to_pylist()) if rid not in ("r01", "r04")]
    atomic_write_table(part, t.take(keep))
    (out / "images" / "r04.png").write_bytes(b"not a png")
    (out / "images" / ".r02.png.x1y2z3.tmp").write_bytes(b"half")
    (RunLayout(out).parts_dir / ".part-00000009.parquet.abc.tmp").write_bytes(b"half")
    (out / "results.parquet").unlink()
    (out / "summary.json").unlink()

    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "2 ok, 0 failed, 4 skipped" in r.stdout
    df = results_df(out)
    assert (df["status"] == "ok").all() and len(df) == 6
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(reference)
    for name, data in reference.items():   # redone in another batch: equal within 1/255
        (tmp_path / "ref.png").write_bytes(data)
        assert np.abs(pixels(out / "images" / name) - pixels(tmp_path / "ref.png")).max() <= 1, name
    redone = df["finished_at"] != finished
    assert sorted(df.index[redone]) == ["r01", "r04"]
    assert not list(out.rglob("*.tmp"))


# ----------------------------------------------------------------------------- SIGTERM

def test_sigterm_finishes_the_batch_flushes_and_exits_143(tmp_path):
    manifest = write_csv(tmp_path / "jobs.csv", rows_for(8))
    out = tmp_path / "out"
    proc = start_run(manifest, out, "--batch-size", "1")
    wait_for_images(proc, out, 1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM, stderr
    assert "SIGTERM: finishing the batch in flight" in stderr and "stopped by SIGTERM" in stdout
    assert "run the same command again to resume" in stdout
    assert "Traceback" not in stderr
    df = results_df(out)  # flushed: results.parquet has every row the journal has
    assert set(df.index) == set(read_prior(out)) and (df["status"] == "ok").all()
    assert 1 <= len(df) < 8
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == sorted(df.index)
    assert not (out / "summary.json").exists()   # the done marker is only written by a finished run



def test_signals_while_the_run_is_finishing_do_not_break_the_flush(tmp_path, monkeypatch):
    """Two SIGTERMs while the writer writes its last rows (a scheduler's TERM, repeated): the rows and
    the results are written, no traceback; signals after the last batch are no interruption."""
    from batchsd.job.writer import ResultWriter

    close = ResultWriter.close

    def close_under_signals(self):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)                        # the handlers have run before the flush goes on
        close(self)

    monkeypatch.setattr(ResultWriter, "close", close_under_signals)
    manifest = write_csv(tmp_path / "jobs.csv", rows_for(3))
    out = tmp_path / "out"
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "already stopping; writing the finished rows" in r.output
    df = results_df(out)
    assert sorted(df.index) == ["r00", "r01", "r02"] and (df["status"] == "ok").all()
    assert (out / "summary.json").exists()

def test_exit_codes():
    s = RunSummary(out_dir=Path("."))
    assert s.exit_code == 0
    s.previously_failed = 1
    assert s.exit_code == 1
    s.interrupted_by = "SIGINT"
    assert s.exit_code == EXIT_SIGINT == 130
    s.interrupted_by = "SIGTERM"
    assert s.exit_code == EXIT_SIGTERM == 143


# ----------------------------------------------------------------------------- what gets redone

def test_verify_remakes_images_damaged_since_they_were_made(tmp_path):
    """A file emptied or edited after its row was made still counts as made, unless --verify: then it
    is hashed against its record and made again, bit for bit the same as before."""
    manifest = write_csv(tmp_path / "jobs.csv", rows_for(3))
    out = tmp_path / "out"
    assert invoke("run", str(manifest), "--model", "tiny", "--out", str(out)).exit_code == 0
    first = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    (out / "images" / "r00.png").write_bytes(b"")
    (out / "images" / "r02.png").write_bytes(first["r02.png"] + b"edited")
    r = invoke("status", str(out))
    assert r.exit_code == 0 and "3 ok" in r.stdout                       # not hashed: looks done
    r = invoke("status", str(out), "--verify")
    assert r.exit_code == 3 and "1 ok, 0 failed, 2 missing" in r.stdout and "with --verify" in r.stdout
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--verify")
    assert r.exit_code == 0 and "2 ok, 0 failed, 1 skipped" in r.stdout, r.output
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == first
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--verify", "--format", "webdataset")
    assert r.exit_code == 2 and "drop --verify" in r.output


def test_images_of_rows_removed_from_the_manifest_are_named_in_a_warning(tmp_path):
    manifest = write_csv(tmp_path / "jobs.csv", rows_for(3))
    out = tmp_path / "out"
    assert invoke("run", str(manifest), "--model", "tiny", "--out", str(out)).exit_code == 0
    write_csv(manifest, rows_for(3)[:1])                         # rows r01 and r02 removed
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 0 and "holds 2 image(s) that no row of the manifest names (r01.png, r02.png)" in r.output
    assert sorted(p.name for p in (out / "images").iterdir()) == ["r00.png", "r01.png", "r02.png"]   # not deleted


def test_changed_params_are_redone_others_skipped(tmp_path):
    manifest = write_csv(tmp_path / "jobs.csv", rows_for(3))
    assert invoke("run", str(manifest), "--model", "tiny").exit_code == 0
    out = tmp_path / "outputs" / "jobs"
    before, images = results_df(out), {p.name: p.read_bytes() for p in (out / "images").iterdir()}

    rows = rows_for(3)
    rows[1] = rows[1].replace("prompt number 1", "a different prompt")
    rows[2] = rows[2].replace(",102,", ",999,")      # new seed
    write_csv(manifest, rows)
    r = invoke("run", str(manifest), "--model", "tiny")
    assert r.exit_code == 0 and "2 ok, 0 failed, 1 skipped" in r.stdout
    after = results_df(out)
    assert after.loc["r00", "finished_at"] == before.loc["r00", "finished_at"]
    for rid in ("r01", "r02"):
        assert after.loc[rid, "finished_at"] > before.loc[rid, "finished_at"]
        assert after.loc[rid, "params_hash"] != before.loc[rid, "params_hash"]
        assert (out / "images" / f"{rid}.png").read_bytes() != images[f"{rid}.png"]
    assert after.loc["r01", "prompt"] == "a different prompt" and after.loc["r02", "seed"] == 999

    images = {rid: pixels(out / "images" / f"{rid}.png") for rid in after.index}
    r = invoke("run", str(manifest), "--model", "tiny", "--overwrite")
    assert r.exit_code == 0 and "3 ok, 0 failed, 0 skipped" in r.stdout
    again = results_df(out)
    assert (again["finished_at"] > after["finished_at"]).all()
    for rid, before_pixels in images.items():   # deterministic: the same image (batching aside, 1/255)
        assert np.abs(pixels(out / "images" / f"{rid}.png") - before_pixels).max() <= 1


def test_error_rows_retried_only_with_retry_errors(tmp_path):
    manifest = write_csv(tmp_path / "jobs.csv", ["a,a cat,,1,2,7.5,euler,64,64,,",
                                                 "b,a dog,,2,4,7.5,euler,64,64,later.png,0.5"])
    out = tmp_path / "outputs" / "jobs"
    r = invoke("run", str(manifest), "--model", "tiny")
    assert r.exit_code == 1
    first = results_df(out)
    assert first.loc["b", "status"] == "error"

    r = invoke("run", str(manifest), "--model", "tiny")
    assert r.exit_code == 1 and "1 failed earlier" in r.stdout and "--retry-errors" in r.stdout
    assert results_df(out).loc["b", "finished_at"] == first.loc["b", "finished_at"]   # not retried

    # (the init image's bytes are part of params_hash: an image that appears would itself be a change)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "later.png")

    r = invoke("run", str(manifest), "--model", "tiny", "--retry-errors")
    assert r.exit_code == 0 and "1 ok, 0 failed, 1 skipped" in r.stdout
    df = results_df(out)
    assert df.loc["b", "status"] == "ok" and pd.isna(df.loc["b", "error"]) and (out / "images" / "b.png").is_file()
    assert df.loc["a", "finished_at"] == first.loc["a", "finished_at"]


def test_decide_model_and_files(tmp_path):
    from batchsd.job.rows import JobRow

    row = JobRow(0, "a", "p", "", 1, 2, 7.5, "euler", 64, 64, None, None, {})
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")

    def prior(**kw):
        rec = dict(status="ok", image_path="images/a.png", latents_path=None, model="sd", model_sha256="1" * 64,
                   params_hash=row.params_hash())
        rec.update(kw)
        return {"a": PriorRecord(**rec)}

    def todo(p, **kw):
        args = dict(model="sd", model_sha256="1" * 64, save_latents=False, overwrite=False, retry_errors=False)
        args.update(kw)
        made_with = RowModels.one(ModelIdentity(args.pop("model"), args.pop("model_sha256")))
        return [r.id for r in decide([row], p, tmp_path, made_with=made_with, **args)[0]]

    assert todo(prior()) == []
    assert todo(prior(), model_sha256="2" * 64) == ["a"]          # another checkpoint
    assert todo(prior(), model="renamed") == []                    # same file under another name
    assert todo(prior(params_hash="old")) == ["a"]
    assert todo(prior(image_path="images/gone.png")) == ["a"]      # image deleted since
    assert todo(prior(), save_latents=True) == ["a"]               # latents asked for now
    assert todo(prior(), overwrite=True) == ["a"]
    assert todo(prior(status="error")) == [] and todo(prior(status="error"), retry_errors=True) == ["a"]
    assert todo(prior(model="tiny-random", model_sha256=None), model="tiny-random", model_sha256=None) == []
    assert todo({}) == ["a"]


@pytest.mark.parametrize("entries_per_name", [4, 0])   # the folder listed once; too big to list (a stat each)
def test_decide_redoes_rows_whose_files_are_missing(tmp_path, monkeypatch, entries_per_name):
    from batchsd.job import present
    from batchsd.job.rows import JobRow

    monkeypatch.setattr(present, "SCAN_ENTRIES_PER_NAME", entries_per_name)
    rows = [JobRow(i, f"r{i}", "p", "", i, 2, 7.5, "euler", 64, 64, None, None, {}) for i in range(12)]
    for folder in ("images", "latents", "images/sub"):
        (tmp_path / folder).mkdir()
    paths = {r.id: (f"images/{r.id}.png", f"latents/{r.id}.npy") for r in rows}
    paths["r8"] = ("images/sub/r8.png", "latents/r8.npy")          # deeper than images/: a stat
    paths["r9"] = ("./images/r9.png", "latents/r9.npy")            # not the writer's form: a stat
    for rid, files in paths.items():
        for f in files:
            (tmp_path / f).write_bytes(b"x")
    (tmp_path / "images" / "r1.png").unlink()                      # image gone: redo
    (tmp_path / "latents" / "r2.npy").unlink()                     # latents gone: redo with --save-latents
    (tmp_path / "images" / "r3.png").unlink()
    (tmp_path / "images" / "r3.png").mkdir()                       # a folder is not an image
    (tmp_path / "images" / "r4.png").unlink()
    (tmp_path / "images" / "r4.png").symlink_to(tmp_path / "nowhere.png")   # dangling link: redo
    (tmp_path / "images" / "r5.png").unlink()
    (tmp_path / "images" / "r5.png").symlink_to(tmp_path / "latents" / "r5.npy")  # a link is not our image: redo
    (tmp_path / "images" / "sub" / "r8.png").unlink()
    prior = {r.id: PriorRecord(status="ok", image_path=paths[r.id][0], latents_path=paths[r.id][1], model="sd",
                               model_sha256=None, params_hash=r.params_hash()) for r in rows}
    prior["r6"].image_path = None                                  # an ok record without an image: redo
    prior["r7"].status = "error"

    def todo(save_latents):
        made, skipped, failed = decide(rows, prior, tmp_path, made_with=RowModels.one(ModelIdentity("sd", None)),
                                       save_latents=save_latents, overwrite=False, retry_errors=False)
        assert skipped + failed + len(made) == len(rows) and failed == 1
        return [r.id for r in made]

    assert todo(False) == ["r1", "r3", "r4", "r5", "r6", "r8"]    # in manifest order
    assert todo(True) == ["r1", "r2", "r3", "r4", "r5", "r6", "r8"]


def test_one_run_per_output_folder(tmp_path):
    from batchsd.job.lock import out_dir_lock

    manifest = write_csv(tmp_path / "jobs.csv", rows_for(1))
    out = tmp_path / "out"
    with out_dir_lock(out, RunLayout(out).lock_path):
        r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 2 and "another batchsd run is writing to" in r.output
    assert not (out / "images").exists()
    assert invoke("run", str(manifest), "--model", "tiny", "--out", str(out)).exit_code == 0  # released


@pytest.mark.parametrize("fmt", ["files", "parquet"])
def test_a_made_row_whose_init_image_went_keeps_its_image(tmp_path, fmt):
    """An init image moved away after its row was made: the rerun keeps the row's result and image
    (a warning says so) instead of failing it over finished work; --overwrite fails it."""
    Image.new("RGB", (64, 64), (10, 120, 200)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,init_image,strength,steps,width,height\na1,x,a.png,0.5,2,64,64\nt1,z,,,2,64,64\n")
    out = tmp_path / "out"
    args = ("run", str(manifest), "--model", "tiny", "--out", str(out), "--format", fmt)
    assert invoke(*args).exit_code == 0
    before = results_df(out)
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".batchsd" not in p.parts
             and p.suffix in (".png", ".parquet") and p.name != "results.parquet"}
    (tmp_path / "a.png").rename(tmp_path / "a.png.moved")
    r = invoke(*args)
    assert r.exit_code == 0 and "have an init image that cannot be read now" in r.output, r.output
    assert "0 to make" in r.output
    after = results_df(out)
    assert after.loc["a1", "status"] == "ok" and after.loc["a1", "image_sha256"] == before.loc["a1", "image_sha256"]
    assert {p: (out / p).read_bytes() for p in files} == files
    r = invoke(*args, "--overwrite")
    assert r.exit_code == 1 and results_df(out).loc["a1", "status"] == "error"


def test_a_failed_row_repointed_to_another_missing_init_image_is_tried_again(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,init_image,strength,steps,width,height\na1,x,gone1.png,0.5,2,64,64\n")
    out = tmp_path / "out"
    assert invoke("run", str(manifest), "--model", "tiny", "--out", str(out)).exit_code == 1
    manifest.write_text(manifest.read_text().replace("gone1.png", "gone2.png"))
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 1 and "1 to make" in r.output, r.output
    assert "gone2.png" in results_df(out).loc["a1", "error"]
