"""Sharded runs end to end (tiny model, 64x64, 2 steps): concurrent shards over one --out equal a
one-process run, a SIGKILLed shard resumes on its own, `batchsd status`, launcher environments
through the CLI, mixing sharded and unsharded runs, and the CLI's engine checks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from PIL import Image
from typer.testing import CliRunner

from batchsd.cli import app
from batchsd.job.shards import ShardSpec, shard_of
from batchsd.job.options import RunOptions
from batchsd.job.run import run
from cli_support import serve_tiny

REPO = Path(__file__).resolve().parents[2]
HEADER = "id,prompt,negative_prompt,seed,steps,cfg_scale,sampler,width,height,init_image,strength,tag"
COMPARE = ["prompt", "seed", "steps", "cfg_scale", "sampler", "width", "height", "tag", "status", "error",
           "params_hash", "model", "image_path"]


@pytest.fixture(autouse=True)
def cached_tiny(monkeypatch, tiny_pipe, tmp_path):
    serve_tiny(monkeypatch, tiny_pipe)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_STEP_ID",
                 "JOB_COMPLETION_INDEX", "BATCHSD_SHARD_COUNT", "BATCHSD_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def write_manifest(path: Path, n: int) -> Path:
    rows = [f"r{i:02d},prompt number {i % 3},,{100 + i},2,7.5,{'euler_a' if i % 2 else 'ddim'},64,64,,,t{i}"
            for i in range(n)]
    rows.append("bad,an img2img row whose init image is missing,,1,2,7.5,euler,64,64,missing.png,0.5,tb")
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def invoke(*args: str, env: dict | None = None):
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def start_shard(manifest: Path, out: Path, shard: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "batchsd.cli", "run", str(manifest), "--model", "tiny",
                             "--out", str(out), "--shard", shard, *extra], cwd=manifest.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_process_run(manifest: Path, out: Path) -> pd.DataFrame:
    s = run(RunOptions(manifest=manifest, model="tiny", out_dir=out, batch_size=2), rich_bar=False)
    assert s.pending == 0
    return pd.read_parquet(out / "results.parquet").set_index("id")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def assert_same_run(ref_out: Path, ref: pd.DataFrame, out: Path, got: pd.DataFrame) -> int:
    """Same rows (manifest order), same records, images within 1/255. Returns the max pixel diff."""
    assert list(got.index) == list(ref.index)
    pd.testing.assert_frame_equal(got[COMPARE], ref[COMPARE])
    worst = 0
    for rid in ref.index[ref["status"] == "ok"]:
        diff = np.abs(pixels(ref_out / ref.loc[rid, "image_path"]) - pixels(out / got.loc[rid, "image_path"]))
        worst = max(worst, int(diff.max()))
    assert worst <= 1
    return worst


def test_concurrent_shards_equal_one_process_run(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 11)
    ref = one_process_run(manifest, tmp_path / "one")

    out = tmp_path / "sharded"
    procs = [start_shard(manifest, out, f"{k}/3", "--batch-size", "2") for k in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    bad_shard = shard_of("bad", 3)
    for k, (p, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        assert p.returncode == (1 if k == bad_shard else 0), stderr[-2000:]
        assert f"shard {k}/3 (from --shard)" in stderr

    # every shard wrote only its own files
    for k in range(3):
        label = ShardSpec(k, 3, "t").label
        part = pd.read_parquet(out / "results" / f"part-{label}.parquet")
        assert all(shard_of(i, 3) == k for i in part["id"]), k
        assert (out / ".batchsd" / f"shard-{label}" / "summary.json").is_file()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.png" for i in ref.index if i != "bad")

    # the parts are one table (pyarrow dataset over results/), equal to the one-process run
    parts = pads.dataset(out / "results").to_table().to_pandas().set_index("id").loc[list(ref.index)]
    assert_same_run(tmp_path / "one", ref, out, parts)
    # the last shard to finish wrote the whole table and the done marker, in manifest order
    merged = pd.read_parquet(out / "results.parquet").set_index("id")
    worst = assert_same_run(tmp_path / "one", ref, out, merged)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["complete"], summary["shard_count"], summary["rows"], summary["ok"], summary["failed"]) == (True, 3, 12, 11, 1)
    print(f"max pixel diff sharded vs one process: {worst}/255")

    r = invoke("status", str(out))
    assert r.exit_code == 1, r.output  # every row made, one failed
    assert "11 ok, 1 failed, 0 missing of 12" in r.output
    for k in range(3):
        assert f"{k}/3" in r.output
    data = json.loads(invoke("status", str(out), "--json").output)
    assert [s["rows"] for s in data["shards"]] == [sum(shard_of(i, 3) == k for i in ref.index) for k in range(3)]
    assert data["overall"]["missing"] == 0 and data["merged"] and data["exit_code"] == 1


def test_killed_shard_resumes_on_its_own(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 14)
    ids = [f"r{i:02d}" for i in range(14)]
    victim = max(range(2), key=lambda k: sum(shard_of(i, 2) == k for i in ids))
    mine = [i for i in ids if shard_of(i, 2) == victim]
    assert len(mine) >= 5
    out = tmp_path / "out"
    other = start_shard(manifest, out, f"{1 - victim}/2", "--batch-size", "2")
    proc = start_shard(manifest, out, f"{victim}/2", "--batch-size", "1")
    deadline = time.monotonic() + 240
    while sum((out / "images" / f"{i}.png").exists() for i in mine) < 2:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    other.communicate(timeout=300)
    assert other.returncode in (0, 1)
    made = sum((out / "images" / f"{i}.png").exists() for i in mine)
    assert made < len(mine), "the shard finished before it was killed"

    r = invoke("status", str(out))
    assert r.exit_code == 3, r.output  # rows missing
    data = json.loads(invoke("status", str(out), "--json").output)
    killed = data["shards"][victim]
    assert killed["state"] == "started" and killed["missing"] > 0 and not data["merged"]
    assert data["shards"][1 - victim]["state"] == "done" and data["shards"][1 - victim]["missing"] == 0
    assert not (out / "results.parquet").exists()

    # re-running only the killed shard completes the set (and merges the whole table)
    again = start_shard(manifest, out, f"{victim}/2", "--batch-size", "2")
    _, stderr = again.communicate(timeout=300)
    assert again.returncode in (0, 1), stderr[-2000:]
    assert "already done" in stderr
    ref = one_process_run(manifest, tmp_path / "one")
    merged = pd.read_parquet(out / "results.parquet").set_index("id")
    assert_same_run(tmp_path / "one", ref, out, merged)
    assert invoke("status", str(out)).exit_code == 1  # complete; the 'bad' row failed


def test_launcher_environment_through_the_cli(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 5)
    out = tmp_path / "out"
    # torchrun: RANK/WORLD_SIZE pick the shard; the source is printed
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--batch-size", "2",
               env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert r.exit_code in (0, 1), r.output
    assert "shard 1/2 (from torchrun RANK=1 WORLD_SIZE=2)" in r.output
    part = pd.read_parquet(out / "results" / "part-00001-of-00002.parquet")
    assert set(part["id"]) == {i for i in [f"r{k:02d}" for k in range(5)] + ["bad"] if shard_of(i, 2) == 1}
    # Kubernetes Indexed Job with the count from the environment
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--batch-size", "2",
               env={"JOB_COMPLETION_INDEX": "0", "BATCHSD_SHARD_COUNT": "2"})
    assert r.exit_code in (0, 1) and "JOB_COMPLETION_INDEX=0" in r.output
    assert (out / "results.parquet").is_file()  # both shards done: merged
    # malformed values stop before anything runs, naming the variable
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(tmp_path / "o2"), env={"JOB_COMPLETION_INDEX": "0"})
    assert r.exit_code == 2 and "BATCHSD_SHARD_COUNT" in r.output and not (tmp_path / "o2").exists()
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(tmp_path / "o2"),
               env={"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert r.exit_code == 2 and "SLURM_ARRAY_TASK_ID" in r.output
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(tmp_path / "o2"), "--shard", "3/3")
    assert r.exit_code == 2 and "--shard" in r.output
    # one out folder holds one shard count
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--shard", "0/3")
    assert r.exit_code == 2 and "2-way run" in r.output
    # a dry run of a shard plans only its rows
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--shard", "1/2", "--dry-run")
    assert r.exit_code == 0 and "shard 1/2" in r.output


def test_sharded_and_unsharded_runs_resume_each_other(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 9)
    ref = one_process_run(manifest, tmp_path / "one")
    out = tmp_path / "out"
    # an unsharded run makes the first 4 rows, then two shards the rest
    assert invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--limit", "4").exit_code == 0
    for k in range(2):
        r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--shard", f"{k}/2", "--batch-size", "2")
        assert r.exit_code in (0, 1), r.output
        own_first4 = sum(shard_of(f"r{i:02d}", 2) == k for i in range(4))
        assert f"{own_first4} already done" in r.output  # made by the unsharded run: not made again
    # each shard's part covers all its rows (records copied from the unsharded journal)
    parts = pads.dataset(out / "results").to_table().to_pandas().set_index("id").loc[list(ref.index)]
    assert_same_run(tmp_path / "one", ref, out, parts)
    merged = pd.read_parquet(out / "results.parquet").set_index("id")
    assert_same_run(tmp_path / "one", ref, out, merged)
    # an unsharded run afterwards has nothing left to make
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 1 and "0 to make" in r.output  # exit 1: the 'bad' row failed earlier
    assert invoke("status", str(out)).exit_code == 1


def test_engine_options(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "m.csv", 2)
    r = invoke("run", str(manifest), "--model", "tiny", "--engine", "ray", "--shard", "0/2")
    assert r.exit_code == 2 and "drop --shard" in r.output
    r = invoke("run", str(manifest), "--model", "tiny", "--workers", "3")
    assert r.exit_code == 2 and "--engine ray" in r.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    r = invoke("run", str(manifest), "--model", "tiny", "--engine", "ray", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "pip install 'batchsd[ray]'" in r.output
    r = invoke("status", str(tmp_path / "nowhere"))
    assert r.exit_code == 2 and "no batchsd run" in r.output


def test_prior_across_journals_and_shared_temp_cleanup(tmp_path):
    from datetime import datetime, timedelta, timezone

    from batchsd.job import atomic, journal as results
    from batchsd.job.schema import results_schema
    from batchsd.job.layout import RunLayout

    schema = results_schema({})
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def record(rid, status, minutes):
        return {"id": rid, "status": status, "params_hash": "h", "finished_at": t0 + timedelta(minutes=minutes),
                "image_path": None}   # no file to look for (compaction leaves out ok rows whose files are gone)

    out = tmp_path / "out"
    whole = results.Journal(out, schema, ["a", "b", "c"])
    whole.append([record("a", "error", 5), record("b", "ok", 1)])
    lay = RunLayout(out, ShardSpec(1, 4, "t"))
    shard = results.Journal(out, schema, ["a", "b"], parts_dir=lay.parts_dir, results_path=lay.results_path)
    shard.append([record("a", "ok", 2), record("b", "ok", 3)])
    prior = results.read_prior(out)
    assert prior["a"].status == "error" and prior["a"].parts_dir == str(whole.parts_dir)   # finished last
    assert prior["b"].status == "ok" and prior["b"].parts_dir == str(lay.parts_dir)
    assert set(results.read_prior(out, [lay.parts_dir])) == {"a", "b"}
    assert lay.resume_parts_dirs() == [out / ".batchsd" / "parts", lay.parts_dir]
    # copying another journal's records in
    shard.append_table(results.latest_records(whole.parts_dir, schema, ["a"]))
    shard.compact()
    part = pd.read_parquet(lay.results_path).set_index("id")
    assert list(part.index) == ["a", "b"] and part.loc["a", "status"] == "error"

    # a shard leaves the in-flight temp files of other processes in shared folders alone
    images = out / "images"
    images.mkdir()
    young, old = images / ".x.png.abc.tmp", images / ".y.png.def.tmp"
    young.write_bytes(b"being written")
    old.write_bytes(b"left by a killed run")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert atomic.remove_stale_temps(images, min_age_s=3600) == 1
    assert young.exists() and not old.exists()


def test_the_merged_table_is_the_latest_record_of_every_row_under_the_current_manifest(tmp_path):
    """The whole job's results.parquet and summary.json: never older than a later run's records, never
    written while a row is not done under the current manifest, with its current pass-through values."""
    manifest = write_manifest(tmp_path / "m.csv", 6)
    out = tmp_path / "out"
    run_cli = lambda *extra: invoke("run", str(manifest), "--model", "tiny", "--out", str(out), *extra)   # noqa: E731
    first = [i for i in (f"r{k:02d}" for k in range(6)) if shard_of(i, 2) == 0][0]
    assert run_cli("--shard", "0/2").exit_code == 1          # the 'bad' row fails in one of them
    text = manifest.read_text()
    manifest.write_text(text.replace(f"{first},prompt number", f"{first},a changed prompt number"))
    r = run_cli("--shard", "1/2")
    assert r.exit_code in (0, 1) and "every shard is done" not in r.output
    assert not (out / "summary.json").exists()               # a row of shard 0 is stale: no done marker
    status = invoke("status", str(out))
    assert status.exit_code == 3 and "run shard(s) 0 again" in status.output
    # an unsharded fix-up makes that row; a later no-op shard run must not put the old record back
    assert run_cli().exit_code == 1
    manifest.write_text(manifest.read_text().replace(",t1\n", ",t1-now\n"))   # a pass-through value changes
    r = run_cli("--shard", "1/2")
    assert "every shard is done" in r.output, r.output
    merged = pd.read_parquet(out / "results.parquet").set_index("id")
    assert merged.loc[first, "prompt"].startswith("a changed prompt")
    assert merged.loc["r01", "tag"] == "t1-now"
    summary = json.loads((out / "summary.json").read_text())
    unsharded = json.loads((tmp_path / "out" / ".batchsd" / "shard-00001-of-00002" / "summary.json").read_text())
    assert set(summary) == set(unsharded)
    assert (summary["complete"], summary["shard_count"], summary["rows"], summary["ok"], summary["failed"]) == \
        (True, 2, 7, 6, 1)
    stamp = (out / "summary.json").stat().st_mtime_ns
    assert invoke("status", str(out)).exit_code == 1 and (out / "summary.json").stat().st_mtime_ns == stamp


def test_a_merged_limited_job_is_not_complete(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 6)
    out = tmp_path / "out"
    for k in range(2):
        invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--shard", f"{k}/2", "--limit", "4")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["complete"], summary["limit"], summary["beyond_limit"], summary["rows"]) == (False, 4, 3, 4)
    # the whole manifest made, then one shard run again with --limit: the table keeps every made row
    full = tmp_path / "full"
    for k in range(2):
        invoke("run", str(manifest), "--model", "tiny", "--out", str(full), "--shard", f"{k}/2")
    invoke("run", str(manifest), "--model", "tiny", "--out", str(full), "--shard", "1/2", "--limit", "2")
    assert len(pd.read_parquet(full / "results.parquet")) == 7
    assert json.loads((full / "summary.json").read_text())["rows"] == 2


def test_a_shard_run_in_a_finished_unsharded_folder_leaves_a_done_marker(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 4)
    out = tmp_path / "out"
    assert invoke("run", str(manifest), "--model", "tiny", "--out", str(out)).exit_code == 1
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--shard", "1/3")
    assert "0 to make" in r.output and "every shard is done" in r.output, r.output
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_status_while_one_shard_runs_names_the_shards_without_a_run(tmp_path):
    from batchsd.job.layout import RunLayout
    from batchsd.job.lock import out_dir_lock

    manifest = write_manifest(tmp_path / "m.csv", 6)
    out = tmp_path / "out"
    invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--shard", "0/3")
    lay = RunLayout(out, ShardSpec(0, 3, "test"))
    with out_dir_lock(out, lay.lock_path):                  # shard 0 "running"; shards 1 and 2 never started
        r = invoke("status", str(out))
    assert r.exit_code == 3 and "shard(s) 0 are in progress" in r.output
    idle = [str(k) for k in (1, 2) if any(shard_of(i, 3) == k for i in [f"r{j:02d}" for j in range(6)] + ["bad"])]
    assert idle and f"shard(s) {', '.join(idle)} have rows to make and no run: start them" in " ".join(r.output.split())


def test_a_pass_through_column_that_changed_type_between_shards_merges(tmp_path):
    out, path = tmp_path / "out", tmp_path / "m.parquet"
    rows = dict(id=[f"r{i}" for i in range(4)], prompt=["a cat"] * 4, seed=[1, 2, 3, 4], steps=[2] * 4,
                width=[64] * 4, height=[64] * 4)
    pd.DataFrame({**rows, "note": ["x", "y", "z", "w"]}).to_parquet(path)
    assert invoke("run", str(path), "--model", "tiny", "--out", str(out), "--shard", "0/2").exit_code == 0
    pd.DataFrame({**rows, "note": [1, 2, 3, 4]}).to_parquet(path)
    r = invoke("run", str(path), "--model", "tiny", "--out", str(out), "--shard", "1/2")
    assert r.exit_code == 0 and "every shard is done" in r.output, r.output
    merged = pd.read_parquet(out / "results.parquet")
    assert merged["note"].tolist() == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == [{"name": "tiny-random", "sha256": None}]
    pd.DataFrame({**rows, "prompt": ["a dog"] + ["a cat"] * 3, "note": [1, 2, 3, 4]}).to_parquet(path)
    report = json.loads(invoke("status", str(out), "--json").output)
    assert report["overall"]["missing"] == 1 and report["merged"] is False
