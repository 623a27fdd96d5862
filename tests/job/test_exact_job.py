"""Exact mode through `batchsd run` (tiny model, 64x64): one job made at batch sizes 1, 3, 4 and 8, as
3 shards (merged), in subprocesses with OMP_NUM_THREADS=1 and 2, killed and resumed, and by the Ray
engine gives every row the same image bytes (file and recorded image_sha256) and latents bytes;
results and run.json record the numerics (torch version, device type, dtype, exact mode), and
resume makes rows again when they change.

In-process runs use the module's tiny pipeline (exact by default on the CPU); runs that need their
own thread count or must die are subprocesses."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from batchsd.job.journal import PriorRecord
from batchsd.job.options import RunOptions
from batchsd.job.resume import MAKE, DONE, Numerics, RowModels, row_states
from batchsd.job.rows import JobRow
from batchsd.job.shards import shard_of
from batchsd.model.pipeline import Pipeline
from cli_support import invoke, serve_tiny

REPO = Path(__file__).resolve().parents[2]
HEADER = "id,prompt,negative_prompt,seed,steps,cfg_scale,sampler,width,height,init_image,strength"
ROWS = [
    "r00,a cat,,100,3,7.5,euler_a,64,64,,",
    "r01,a dog,blurry,101,3,5,euler_a,64,64,,",
    "r02,a cat,,102,3,1,euler_a,64,64,,",                      # cfg 1: no unconditional half
    "r03,a hill at dusk,low quality,103,3,9,euler_a,64,64,,",
    "r04,a red car,,104,3,7.5,dpmpp_2m_karras,64,64,,",
    "r05,a dog,blurry,105,3,6,dpmpp_2m_karras,64,64,,",
    "r06,a bowl of fruit,,106,3,7.5,ddim,64,64,,",
    "r07,a photo,blurry,107,4,7.5,euler_a,64,64,init.png,0.6",  # image-to-image
    "r08,a painting,,108,4,8,euler_a,64,64,init.png,0.5",
    "r09,a robot,,109,3,7.5,euler_a,64,64,,",
    "bad,an init image that is missing,,1,3,7.5,euler_a,64,64,missing.png,0.5",
]
OK_IDS = [r.split(",")[0] for r in ROWS if not r.startswith("bad")]


@pytest.fixture(autouse=True)
def cached_tiny(monkeypatch, tiny_pipe, tmp_path):
    """The module's tiny pipeline (exact, the CPU default) for `--model tiny` with default options;
    --exact/--no-exact and the other options load their own."""
    assert tiny_pipe.exact
    real_load = Pipeline.load.__func__
    serve_tiny(monkeypatch, tiny_pipe)
    served = Pipeline.load.__func__

    def load(cls, model, device="auto", dtype="auto", **options):
        if options.get("exact") is not None:
            return real_load(cls, model, device, dtype, **options)
        return served(cls, model, device, dtype, **options)

    monkeypatch.setattr(Pipeline, "load", classmethod(load))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_STEP_ID",
                 "JOB_COMPLETION_INDEX", "BATCHSD_SHARD_COUNT", "BATCHSD_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def write_job(folder: Path) -> Path:
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(folder / "init.png")
    path = folder / "m.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(out: Path) -> dict[str, tuple[str, str, str]]:
    """Per ok row: (recorded image_sha256, sha256 of the image file, sha256 of the latents file)."""
    table = pd.read_parquet(out / "results.parquet").set_index("id")
    assert table.loc["bad", "status"] == "error"
    ok = table[table["status"] == "ok"]
    assert sorted(ok.index) == OK_IDS
    assert ok["exact"].all()
    return {rid: (ok.loc[rid, "image_sha256"], sha(out / ok.loc[rid, "image_path"]),
                  sha(out / ok.loc[rid, "latents_path"])) for rid in ok.index}


def subprocess_run(manifest: Path, out: Path, threads: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "batchsd.cli", "run", str(manifest), "--model", "tiny",
                             "--out", str(out), "--save-latents", *extra], cwd=manifest.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr[-2000:]        # 1: the 'bad' row failed, the others are ok


def test_same_bytes_across_batch_sizes_shards_threads_and_resume(tmp_path):
    manifest = write_job(tmp_path)
    # subprocesses first (they run beside the in-process runs' start-up)
    threads = {t: subprocess_run(manifest, tmp_path / f"threads{t}", t, "--batch-size", "4") for t in (1, 2)}

    outs = {}
    for b in (1, 3, 4, 8):
        outs[f"batch {b}"] = tmp_path / f"b{b}"
        assert invoke("run", str(manifest), "--model", "tiny", "--out", str(outs[f"batch {b}"]), "--save-latents",
                      "--batch-size", str(b)).exit_code == 1
    sharded = tmp_path / "sharded"
    for k in range(3):
        assert invoke("run", str(manifest), "--model", "tiny", "--out", str(sharded), "--save-latents",
                      "--shard", f"{k}/3", "--batch-size", "2").exit_code in (0, 1)
    assert len({shard_of(rid, 3) for rid in OK_IDS}) == 3      # every shard made rows
    outs["3 shards, merged"] = sharded

    # kill the batch-1 run once it has made two rows, then resume it at batch size 4 (started only now:
    # started beside the runs above, it could finish before they did)
    victim_out = tmp_path / "killed"
    victim = subprocess_run(manifest, victim_out, 2, "--batch-size", "1")
    deadline = time.monotonic() + 300
    while len(list((victim_out / "images").glob("*.png"))) < 2:
        assert victim.poll() is None, victim.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    made = len(list((victim_out / "images").glob("*.png")))
    assert made < len(OK_IDS), "the run finished before it was killed"
    resumed = invoke("run", str(manifest), "--model", "tiny", "--out", str(victim_out), "--save-latents",
                     "--batch-size", "4")
    assert resumed.exit_code == 1 and "already done" in resumed.output
    outs["killed at batch 1, resumed at 4"] = victim_out

    for t, proc in threads.items():
        finish(proc)
        outs[f"OMP_NUM_THREADS={t}"] = tmp_path / f"threads{t}"

    ref = fingerprint(outs["batch 1"])
    for name, out in outs.items():
        assert fingerprint(out) == ref, name


def test_ray_engine_makes_the_same_bytes(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'batchsd[ray]'")
    from batchsd.scale.ray_engine import run_ray

    manifest = write_job(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)            # the local run on 2 threads, the Ray actors on 1 each
    try:
        assert invoke("run", str(manifest), "--model", "tiny", "--out", str(tmp_path / "one"), "--save-latents",
                      "--batch-size", "3").exit_code == 1
    finally:
        torch.set_num_threads(threads)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        s = run_ray(RunOptions(manifest=manifest, model="tiny", out_dir=tmp_path / "ray", batch_size=2,
                               device="cpu", save_latents=True), workers=2, rich_bar=False, rows_per_call=3)
    finally:
        if started:
            ray.shutdown()
    assert (s.ok, s.failed) == (len(OK_IDS), 1)
    assert fingerprint(tmp_path / "ray") == fingerprint(tmp_path / "one")


def test_numerics_recorded_and_a_change_remakes_rows(tmp_path):
    manifest = write_job(tmp_path)
    out = tmp_path / "out"

    def run(*extra: str):
        result = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), *extra)
        assert result.exit_code == 1, result.output
        table = pd.read_parquet(out / "results.parquet").set_index("id")
        meta = json.loads((out / ".batchsd" / "run.json").read_text())
        return result.output, table, meta

    output, table, meta = run()
    ok = table[table["status"] == "ok"]
    for source in (ok.iloc[0], meta):
        assert (source["torch_version"], source["device_type"], source["dtype"], bool(source["exact"])) == \
            (torch.__version__, "cpu", "float32", True)
    assert ok["exact"].all()
    # the speed choices, per row: the CPU kind (with the processor) and Winograd (off: fp32)
    from batchsd.model.devices import cpu_kind
    assert (ok["cpu"] == str(cpu_kind())).all() and not ok["winograd"].any() and not ok["fused_epilogues"].any()
    assert pd.isna(table.loc["bad", "cpu"])     # it failed before the model (as its numerics: none)
    # and in summary.json whether MKL ran in its strict reproducible mode (fast/exact.mkl_strict)
    from batchsd.model.fast.exact import mkl_strict
    assert json.loads((out / "summary.json").read_text())["mkl_strict"] == mkl_strict()
    made_exact = dict(ok["finished_at"])

    output, table, meta = run()                                   # nothing changed: nothing made
    assert "0 to make" in output and dict(table.loc[OK_IDS, "finished_at"]) == made_exact

    output, table, meta = run("--no-exact")                       # exact mode off: every ok row again
    assert f"{len(OK_IDS)} to make" in output and "failed earlier" in output   # the 'bad' row is not
    assert not table.loc[OK_IDS, "exact"].any() and meta["exact"] is False
    assert all(table.loc[rid, "finished_at"] > made_exact[rid] for rid in OK_IDS)

    output, _, _ = run("--no-exact")
    assert "0 to make" in output
    output, table, meta = run("--dtype", "bf16", "--no-exact")    # another dtype: again
    assert f"{len(OK_IDS)} to make" in output
    assert set(table.loc[OK_IDS, "dtype"]) == {"bfloat16"} and meta["dtype"] == "bfloat16"
    assert set(table.loc[OK_IDS, "prediction_type"]) == {"epsilon"} and meta["prediction_type"] == "epsilon"
    # bf16's speed choices as the CPU's kind decides them, per row and in summary.json
    from batchsd.model.devices import default_fused_epilogues
    fused = default_fused_epilogues(torch.device("cpu"), torch.bfloat16)
    assert set(table.loc[OK_IDS, "fused_epilogues"]) == {fused}
    assert json.loads((out / "summary.json").read_text())["fused_epilogues"] is fused
    # the same file read with another prediction type makes other images: again
    output, table, meta = run("--dtype", "bf16", "--no-exact", "--prediction-type", "v_prediction")
    assert f"{len(OK_IDS)} to make" in output
    assert set(table.loc[OK_IDS, "prediction_type"]) == {"v_prediction"} and meta["prediction_type"] == "v_prediction"
    output, _, _ = run("--dtype", "bf16", "--no-exact", "--prediction-type", "v_prediction")
    assert "0 to make" in output


def test_row_states_compare_numerics_as_they_compare_models(tmp_path):
    row = JobRow(0, "a", "p", "", 1, 2, 7.5, "euler", 64, 64, None, None, {})
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    now = Numerics("2.13.0+cpu", "cpu", "float32", True, "epsilon")

    def state(numerics, **made_with):
        rec = dict(status="ok", image_path="images/a.png", latents_path=None, model="m", model_sha256=None,
                   params_hash=row.params_hash(), **made_with)
        return row_states([row], {"a": PriorRecord(**rec)}, tmp_path, made_with=RowModels.one(None, numerics))[0]

    same = now.columns()
    assert state(now, **same) == DONE
    for column, other in (("torch_version", "2.14.0+cpu"), ("device_type", "cuda"), ("dtype", "bfloat16"),
                          ("exact", False), ("prediction_type", "v_prediction")):
        assert state(now, **{**same, column: other}) == MAKE, column
    assert state(now, **{**same, "prediction_type": None}) == DONE   # a row from before it was recorded
    assert state(None, **{**same, "exact": False}) == DONE     # numerics not known (status, dry run)
    assert state(now) == DONE                                  # a record that carries none
