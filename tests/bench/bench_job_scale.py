"""Job-layer scale: what the batch machinery costs when the manifest and the results get large.

    python tests/bench/bench_job_scale.py             # 1,000,000-row validate; 100k-row resume; writer at 1k/10k/100k
    python tests/bench/bench_job_scale.py --quick     # 200k-row validate, 20k-row resume, writer at 1k/10k

Figures (targets from the issue "Speed, memory and scale"):
  1. `batchsd validate` on a 1,000,000-row manifest (CSV and Parquet), the real CLI in a fresh
     subprocess: wall time and peak RSS (os.wait4's ru_maxrss of that child). Target < 30 s, < 2 GiB.
  2. Resume scan over 100,000 finished rows: an output folder holding a journal with 100k ok records
     (written with batchsd.job.journal.Journal, as a run leaves it) and their image files (empty
     placeholders: decide() only checks that they exist). Timed in process: read_prior + decide
     (the scan itself); and the whole `batchsd run --model tiny` that finds nothing to do (imports,
     manifest, tiny model, scan, final compaction). Target < 10 s.
  3. The results writer (batchsd.job.writer.ResultWriter, the run's writer thread) on a journal that
     already holds 1k, 10k and 100k rows: seconds per row of its own work (PNG encode of a 64x64
     image, atomic fsynced image file, part file, compaction when due) over 64 batches of 4 rows.
     Steady state = median per batch; the mean includes the compactions that fall in the window.
     Target: does not grow with rows already written.

Files go to a temporary folder (removed at the end; --keep to keep it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_manifest import make_table  # noqa: E402  (realistic job rows; some ids and seeds left to defaults)

# The real CLI in a fresh interpreter; at exit it writes its own peak RSS (VmHWM: the peak of this
# process's address space; ru_maxrss would also carry the parent's size at fork time) to the fd named by $BENCH_HWM_FD.
CLI = [sys.executable, "-c", (
    "import atexit, os, sys\n"
    "def hwm():\n"
    "    kb = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
    "    os.write(int(os.environ['BENCH_HWM_FD']), kb.encode())\n"
    "atexit.register(hwm)\n"
    "from batchsd.cli import main\n"
    "sys.argv[0] = 'batchsd'\n"
    "main()\n")]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_manifest(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def run_child(cmd: list[str], cwd: Path | None = None) -> tuple[float, float, int]:
    """(wall s, peak RSS GiB, exit code) of one CLI subprocess; the peak is the child's own VmHWM."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(w,),
                            env={**os.environ, "PYTHONPATH": str(REPO), "BENCH_HWM_FD": str(w)})
    os.close(w)
    err = proc.stderr.read()
    proc.wait()
    wall = time.perf_counter() - t0
    kib = os.read(r, 64)
    os.close(r)
    rss = int(kib) / 2**20 if kib else float("nan")
    if proc.returncode not in (0,):
        log(f"  exit {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return wall, rss, proc.returncode


# ---------------------------------------------------------------- 1. validate
def bench_validate(tmp: Path, n: int) -> list[dict]:
    table = make_table(n)
    out = []
    for suffix in (".csv", ".parquet"):
        path = write_manifest(table, tmp / f"manifest-{n}{suffix}")
        wall, rss, code = run_child(CLI + ["validate", str(path)])
        out.append(dict(format=suffix[1:], rows=n, wall_s=wall, peak_rss_gib=rss, exit_code=code,
                        size_mib=path.stat().st_size / 2**20))
        log(f"validate {suffix} {n} rows: {wall:.1f} s, peak RSS {rss:.2f} GiB, exit {code}")
    return out


# ---------------------------------------------------------------- 2-3. journal fixtures
def finished_records(rows, model: str, sha: str | None) -> list[dict]:
    """Records as the writer leaves them for ok rows (images/<id>.png)."""
    from batchsd.job.schema import now_utc

    now = now_utc()
    recs = []
    for r in rows:
        rec = r.to_record()
        rec.update(params_hash=r.params_hash(), status="ok", error=None, image_path=f"images/{r.id}.png",
                   image_sha256="0" * 64, latents_path=None, model=model, model_sha256=sha, elapsed_s=1.0,
                   finished_at=now, prompt_truncated=False)
        recs.append(rec)
    return recs


def prefill(out_dir: Path, manifest_path: Path, n_done: int, touch_images: bool, part_rows: int = 10_000):
    """Journal n_done finished rows of the manifest into out_dir (parts of part_rows, then one
    compaction, as a long run leaves it). Returns (manifest, rows, schema)."""
    from batchsd.job.manifest import read_manifest
    from batchsd.job.journal import Journal
    from batchsd.job.schema import extra_types_for, results_schema

    m = read_manifest(manifest_path)
    assert not m.problems, m.format_problems()
    schema = results_schema(extra_types_for([r.to_record() for r in m.rows], m.extra_columns))
    journal = Journal(out_dir, schema, [r.id for r in m.rows])
    done = m.rows[:n_done]
    for i in range(0, n_done, part_rows):
        journal.append(finished_records(done[i:i + part_rows], "tiny-random", None))
    if n_done:
        journal.compact()
    if touch_images:
        images = out_dir / "images"
        images.mkdir(parents=True, exist_ok=True)
        for r in done:
            (images / f"{r.id}.png").touch()
    return m, schema


def bench_resume(tmp: Path, n: int) -> dict:
    from batchsd.job.journal import read_prior
    from batchsd.job.resume import ModelIdentity, RowModels, decide

    table = make_table(n, seed=1)
    table = table.set_column(table.column_names.index("width"), "width", pa.array([64] * n))
    table = table.set_column(table.column_names.index("height"), "height", pa.array([64] * n))
    manifest = write_manifest(table, tmp / f"resume-{n}.csv")
    out_dir = tmp / f"resume-{n}-out"
    t0 = time.perf_counter()
    m, _ = prefill(out_dir, manifest, n, touch_images=True)
    log(f"resume: prefilled {n} finished rows in {time.perf_counter() - t0:.0f} s")
    scans = []
    for _ in range(3):
        t0 = time.perf_counter()
        prior = read_prior(out_dir)
        t1 = time.perf_counter()
        todo, skipped, _ = decide(m.rows, prior, out_dir, made_with=RowModels.one(ModelIdentity("tiny-random", None)),
                                  save_latents=False, overwrite=False, retry_errors=False)
        t2 = time.perf_counter()
        assert not todo and skipped == n, (len(todo), skipped)
        scans.append((t1 - t0, t2 - t1))
    read_s = statistics.median(s[0] for s in scans)
    decide_s = statistics.median(s[1] for s in scans)
    log(f"resume scan {n} rows: read_prior {read_s:.2f} s + decide {decide_s:.2f} s")
    wall, rss, code = run_child(CLI + ["run", str(manifest), "--model", "tiny", "--out", str(out_dir)])
    log(f"resume `batchsd run` over {n} finished rows: {wall:.1f} s, peak RSS {rss:.2f} GiB, exit {code}")
    return dict(rows=n, read_prior_s=read_s, decide_s=decide_s, scan_s=read_s + decide_s, cli_wall_s=wall,
                cli_peak_rss_gib=rss, cli_exit=code)


def bench_writer(tmp: Path, already: int, batches: int = 64, batch_rows: int = 4) -> dict:
    from PIL import Image

    from batchsd.job.journal import Journal
    from batchsd.job.writer import BatchResult, ResultWriter

    n = already + batches * batch_rows
    table = make_table(n, seed=2)
    manifest = write_manifest(table, tmp / f"writer-{already}.parquet")
    out_dir = tmp / f"writer-{already}-out"
    m, schema = prefill(out_dir, manifest, already, touch_images=False)
    # a resumed run: a fresh Journal over the existing parts, a fresh writer thread
    journal = Journal(out_dir, schema, [r.id for r in m.rows])
    per_batch: list[float] = []
    last = [0.0]
    writer = None

    def on_written(n_ok: int, n_failed: int) -> None:
        per_batch.append(writer.write_seconds - last[0])
        last[0] = writer.write_seconds

    writer = ResultWriter(out_dir, journal, save_latents=False, on_written=on_written)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    new_rows = m.rows[already:]
    t0 = time.perf_counter()
    for i in range(0, len(new_rows), batch_rows):
        chunk = new_rows[i:i + batch_rows]
        recs = [dict(r.to_record(), params_hash=r.params_hash(), model="tiny-random", model_sha256=None) for r in chunk]
        writer.submit(BatchResult(records=recs, images=[image] * len(chunk), errors=[None] * len(chunk), elapsed_s=1.0))
    writer.close()
    wall = time.perf_counter() - t0
    steady = statistics.median(per_batch) / batch_rows
    mean = sum(per_batch) / (len(per_batch) * batch_rows)
    worst = max(per_batch)
    log(f"writer after {already} rows: steady {steady * 1e3:.2f} ms/row, mean {mean * 1e3:.2f} ms/row "
        f"(worst batch {worst:.2f} s), wall {wall:.1f} s for {len(new_rows)} rows")
    return dict(already=already, rows=len(new_rows), steady_ms_per_row=steady * 1e3, mean_ms_per_row=mean * 1e3,
                worst_batch_s=worst)


def fmt_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="validate,resume,writer")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    only = set(args.only.split(","))
    n_validate = 200_000 if args.quick else 1_000_000
    n_resume = 20_000 if args.quick else 100_000
    writer_sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]

    tmp = Path(tempfile.mkdtemp(prefix="batchsd-jobscale-"))
    t_start = time.perf_counter()
    out = [f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, command "
           f"`python tests/bench/{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}`"]
    try:
        if "validate" in only:
            res = bench_validate(tmp, n_validate)
            out += ["", "`batchsd validate` (fresh subprocess; target < 30 s and < 2 GiB at 1M rows)",
                    fmt_table(["format", "rows", "file MiB", "wall s", "peak RSS GiB", "exit"],
                              [[r["format"], f"{r['rows']:,}", f"{r['size_mib']:.0f}", f"{r['wall_s']:.1f}",
                                f"{r['peak_rss_gib']:.2f}", r["exit_code"]] for r in res])]
        if "resume" in only:
            r = bench_resume(tmp, n_resume)
            out += ["", f"Resume over {r['rows']:,} finished rows (target < 10 s)",
                    fmt_table(["read_prior s", "decide s", "scan s", "`batchsd run` nothing-to-do wall s",
                               "its peak RSS GiB", "exit"],
                              [[f"{r['read_prior_s']:.2f}", f"{r['decide_s']:.2f}", f"{r['scan_s']:.2f}",
                                f"{r['cli_wall_s']:.1f}", f"{r['cli_peak_rss_gib']:.2f}", r["cli_exit"]]])]
        if "writer" in only:
            res = [bench_writer(tmp, n) for n in writer_sizes]
            out += ["", "Results writer, 64 batches x 4 rows of 64x64 images after N rows already written (must not grow)",
                    fmt_table(["rows already written", "steady ms/row", "mean ms/row (incl. compaction)", "worst batch s"],
                              [[f"{r['already']:,}", f"{r['steady_ms_per_row']:.2f}", f"{r['mean_ms_per_row']:.2f}",
                                f"{r['worst_batch_s']:.2f}"] for r in res])]
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(out) + f"\n\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
