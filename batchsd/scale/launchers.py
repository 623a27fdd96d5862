"""Who am I: the shard this process makes, from --shard or the launcher's environment.

A row belongs to shard `planner.shard_of(row.id, N)` (sha256 of the id): a stable function of the
id alone, so adding or removing rows never moves the others, any machine computes the same split
without talking to the rest, and a row's image does not depend on N (seeds are per row).

Where I/N comes from, first match wins:

    1. --shard I/N                      explicit (environment ignored)
    2. the launcher's environment, as two levels that multiply:
       outer (separate jobs)    SLURM job array      SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT,
                                                     SLURM_ARRAY_TASK_MIN/MAX/STEP
                                Kubernetes Indexed   JOB_COMPLETION_INDEX + a count from
                                Job                  --shard-count or $BATCHSD_SHARD_COUNT
       inner (processes of one  torchrun             RANK, WORLD_SIZE (LOCAL_RANK picks the GPU)
       job)                     srun                 SLURM_PROCID, SLURM_NTASKS (> 1), only inside a
                                                     job step (SLURM_STEP_ID set)
       index = outer_index * inner_count + inner_index, count = outer_count * inner_count
    3. nothing: the whole manifest (no shard).

Decisions:
- torchrun beats srun: under `srun torchrun ...`, RANK/WORLD_SIZE already number every process of
  every node, so SLURM_PROCID is not counted again.
- A SLURM array and srun (or torchrun) combine: an array of 4 tasks, each `srun -n 2`, is 8
  shards; array task k makes shards 2k and 2k+1.
- A batch script itself (no srun) has SLURM_PROCID=0 and SLURM_NTASKS=N but no SLURM_STEP_ID: it
  is not split (it makes its whole slice); launch `srun batchsd run ...` to split across tasks.
- SLURM array ids map densely to 0..COUNT-1: index = (TASK_ID - MIN) / STEP, so --array=1-16
  and --array=0-30:2 both give shards 0..15. A list that is not one evenly stepped range
  (--array=1,4,9) has no dense mapping and is refused, except with --shard-count N (or
  $BATCHSD_SHARD_COUNT), which says "the array task id IS the shard index, of N": that is how to
  re-run only some shards (--array=3,7 --shard-count 16 or $BATCHSD_SHARD_COUNT=16).
- JOB_COMPLETION_INDEX inside a torchrun that spans several nodes (WORLD_SIZE > LOCAL_WORLD_SIZE)
  is the node index of that same torchrun job (JobSet, Kubeflow Trainer), so torchrun's RANK alone
  is used; one pod per index running a one-node torchrun combines as above.
- --shard-count / $BATCHSD_SHARD_COUNT is the TOTAL number of shards. It supplies the count for a
  Kubernetes index (and for a SLURM array whose task ids are shard indices) and is checked against
  the count found everywhere else; given alone it is an error (nothing says which shard this is).
- A count of 1 (e.g. torchrun --nproc-per-node=1) is the unsharded run.

Every malformed value is an InputError naming the variable and the fix.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from batchsd.errors import InputError
from batchsd.job.shards import ShardSpec

SHARD_COUNT_ENV = "BATCHSD_SHARD_COUNT"


# ----------------------------------------------------------------------------- parsing

_SHARD_RE = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


def parse_shard(text: str, source: str = "--shard") -> ShardSpec:
    """'I/N' -> ShardSpec(I, N); 0 <= I < N. InputError otherwise."""
    m = _SHARD_RE.match(text or "")
    if not m:
        raise InputError(f"{source} {text!r}: write it as INDEX/COUNT with whole numbers, e.g. 3/16 "
                         "(shards are numbered from 0)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise InputError(f"{source} {text!r}: the count must be >= 1")
    if not 0 <= index < count:
        raise InputError(f"{source} {text!r}: the index must be in 0..{count - 1} (shards are numbered from 0)")
    return ShardSpec(index, count, source)


def _int(env: Mapping[str, str], name: str, fix: str, *, default: int | None = None, minimum: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise InputError(f"${name}={raw!r} is not a whole number; {fix}") from None
    if minimum is not None and value < minimum:
        raise InputError(f"${name}={raw!r} must be >= {minimum}; {fix}")
    return value


def _count_option(env: Mapping[str, str], shard_count_option: int | None) -> tuple[int | None, str | None]:
    if shard_count_option is not None:
        if shard_count_option < 1:
            raise InputError(f"--shard-count {shard_count_option}: use a whole number >= 1")
        return shard_count_option, "--shard-count"
    count = _int(env, SHARD_COUNT_ENV, "set it to the total number of shards (e.g. a Kubernetes Job's completions)",
                 minimum=1)
    return count, (f"${SHARD_COUNT_ENV}" if count is not None else None)


# ----------------------------------------------------------------------------- launchers

@dataclass(frozen=True)
class _Level:
    index: int
    count: int | None     # None: outer level whose count is the --shard-count (task id = shard index)
    source: str
    local_rank: int | None = None


def _torchrun(env: Mapping[str, str]) -> _Level | None:
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    fix = "torchrun sets RANK and WORLD_SIZE together; unset both, or pass --shard I/N"
    if "RANK" not in env or "WORLD_SIZE" not in env:
        missing = "RANK" if "RANK" not in env else "WORLD_SIZE"
        raise InputError(f"${missing} is not set but {'WORLD_SIZE' if missing == 'RANK' else 'RANK'} is; {fix}")
    world = _int(env, "WORLD_SIZE", fix, minimum=1)
    rank = _int(env, "RANK", fix, minimum=0)
    if world is None or rank is None:
        raise InputError(f"$RANK/$WORLD_SIZE are empty; {fix}")
    if rank >= world:
        raise InputError(f"$RANK={rank} is not below $WORLD_SIZE={world}; {fix}")
    local = _int(env, "LOCAL_RANK", "torchrun sets LOCAL_RANK to the process index on the node", minimum=0)
    return _Level(rank, world, f"torchrun RANK={rank} WORLD_SIZE={world}", local)


def _srun(env: Mapping[str, str]) -> _Level | None:
    if "SLURM_PROCID" not in env or not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        return None  # not inside an srun step (a batch script has SLURM_PROCID=0 too)
    fix = "these are set by srun; launch with `srun -n N batchsd run ...` or pass --shard I/N"
    name = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    ntasks = _int(env, name, fix, minimum=1)
    if ntasks is None or ntasks <= 1:
        return None
    procid = _int(env, "SLURM_PROCID", fix, minimum=0)
    if procid is None or procid >= ntasks:
        raise InputError(f"$SLURM_PROCID={env.get('SLURM_PROCID')!r} is not in 0..{ntasks - 1} (${name}={ntasks}); {fix}")
    local = _int(env, "SLURM_LOCALID", fix, minimum=0)
    return _Level(procid, ntasks, f"srun SLURM_PROCID={procid} {name}={ntasks}", local)


def _slurm_array(env: Mapping[str, str], explicit_count: bool) -> _Level | None:
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    fix = "submit with `sbatch --array=0-(N-1)` (any evenly stepped range works), or pass --shard I/N"
    task_id = _int(env, "SLURM_ARRAY_TASK_ID", fix, minimum=0)
    if task_id is None:
        raise InputError(f"$SLURM_ARRAY_TASK_ID is empty; {fix}")
    if explicit_count:  # the task id is the shard index itself (re-running chosen shards)
        return _Level(task_id, None, f"SLURM array task {task_id} (task id = shard index)")
    lo = _int(env, "SLURM_ARRAY_TASK_MIN", fix, default=0, minimum=0)
    step = _int(env, "SLURM_ARRAY_TASK_STEP", fix, default=1, minimum=1)
    hi = _int(env, "SLURM_ARRAY_TASK_MAX", fix, minimum=0)
    count = _int(env, "SLURM_ARRAY_TASK_COUNT", fix, minimum=1)
    if count is None:
        if hi is None:
            raise InputError("$SLURM_ARRAY_TASK_ID is set but neither $SLURM_ARRAY_TASK_COUNT nor "
                             "$SLURM_ARRAY_TASK_MAX is: the number of shards is unknown; pass --shard-count N "
                             "(the task id is then the shard index) or --shard I/N")
        count = (hi - lo) // step + 1
    sparse_fix = (f"this array is not one evenly stepped range, so its task ids do not map onto shards "
                  f"0..{count - 1}: submit --array=0-{count - 1}, or keep these task ids and pass --shard-count N "
                  f"(or ${SHARD_COUNT_ENV}=N) with the total number of shards: each task id is then the shard index")
    if task_id < lo or (task_id - lo) % step:
        raise InputError(f"$SLURM_ARRAY_TASK_ID={task_id} is not $SLURM_ARRAY_TASK_MIN={lo} plus a multiple of "
                         f"$SLURM_ARRAY_TASK_STEP={step}; {sparse_fix}")
    if hi is not None and hi - lo != step * (count - 1):
        raise InputError(f"SLURM array with MIN={lo} MAX={hi} STEP={step} has COUNT={count} tasks, not "
                         f"{(hi - lo) // step + 1}; {sparse_fix}")
    index = (task_id - lo) // step
    if index >= count:
        raise InputError(f"$SLURM_ARRAY_TASK_ID={task_id} maps to index {index}, beyond "
                         f"$SLURM_ARRAY_TASK_COUNT={count}; {sparse_fix}")
    detail = f"SLURM_ARRAY_TASK_ID={task_id}" + (f" MIN={lo}" if lo else "") + (f" STEP={step}" if step > 1 else "")
    return _Level(index, count, f"SLURM array task {index} of {count} ({detail})")


def _k8s_index(env: Mapping[str, str]) -> _Level | None:
    if "JOB_COMPLETION_INDEX" not in env:
        return None
    fix = "Kubernetes sets it in Indexed Jobs (completionMode: Indexed); or pass --shard I/N"
    index = _int(env, "JOB_COMPLETION_INDEX", fix, minimum=0)
    if index is None:
        raise InputError(f"$JOB_COMPLETION_INDEX is empty; {fix}")
    return _Level(index, None, f"Kubernetes JOB_COMPLETION_INDEX={index}")


# ----------------------------------------------------------------------------- detection

def detect_shard(env: Mapping[str, str] | None = None, shard_count_option: int | None = None) -> ShardSpec | None:
    """The shard this process makes according to its environment (see the module docstring), or
    None when nothing applies. InputError for malformed or contradictory values."""
    env = os.environ if env is None else env
    total, total_source = _count_option(env, shard_count_option)

    inner = _torchrun(env)
    inner_ignored = None
    if inner is None:
        inner = _srun(env)
    elif "SLURM_PROCID" in env and (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        inner_ignored = "srun's SLURM_PROCID (torchrun numbers every process)"

    array = _slurm_array(env, explicit_count=total is not None)
    k8s = _k8s_index(env)
    if array is not None and k8s is not None:
        raise InputError("both $SLURM_ARRAY_TASK_ID and $JOB_COMPLETION_INDEX are set: it is unclear which one numbers "
                         "the shards; unset one, or pass --shard I/N")
    outer = array or k8s
    if k8s is not None and inner is not None and inner.source.startswith("torchrun"):
        local_world = _int(env, "LOCAL_WORLD_SIZE", "torchrun sets it to the processes per node", minimum=1)
        if local_world is not None and inner.count > local_world:
            outer, inner_ignored = None, "JOB_COMPLETION_INDEX (torchrun spans several pods: RANK is job-wide)"

    if outer is None and inner is None:
        if total is not None:
            raise InputError(f"{total_source} {total} is given but nothing says which shard this process is: pass "
                             f"--shard I/{total}, or run under a SLURM array, srun, torchrun or a Kubernetes Indexed Job")
        return None

    inner_index, inner_count = (inner.index, inner.count) if inner is not None else (0, 1)
    if outer is None:
        index, count = inner_index, inner_count
        if total is not None and total != count:
            raise InputError(f"{total_source} {total} does not match the {count} process(es) of {inner.source}: "
                             f"drop {total_source} or make them agree")
    else:
        if outer.count is None:  # its index is a shard index of `total`
            if total is None:
                raise InputError(f"{outer.source} is set but the number of shards is not: set "
                                 f"${SHARD_COUNT_ENV} (or pass --shard-count) to the total number of shards, "
                                 "e.g. the Indexed Job's spec.completions")
            if total % inner_count:
                raise InputError(f"{total_source} {total} is not a multiple of the {inner_count} processes of "
                                 f"{inner.source}: set it to (number of indices) x {inner_count}")
            outer_count = total // inner_count
            if outer.index >= outer_count:
                raise InputError(f"{outer.source} is not below {outer_count} = {total_source} {total}"
                                 + (f" / {inner_count} processes" if inner_count > 1 else "")
                                 + f": set {total_source} to the total number of shards (indices 0..N-1)")
        else:
            outer_count = outer.count
        index, count = outer.index * inner_count + inner_index, outer_count * inner_count
        if total is not None and outer.count is not None and total != count:
            raise InputError(f"{total_source} {total} does not match the {count} shard(s) found ({outer.source}"
                             + (f" x {inner.source}" if inner else "") + f"): drop {total_source} or make them agree")
    parts = [lvl.source for lvl in (outer, inner) if lvl is not None]
    source = " x ".join(parts) + (f"; ignored {inner_ignored}" if inner_ignored else "")
    return ShardSpec(index, count, source, inner.local_rank if inner is not None else None)


def resolve_shard(shard_option: str | None, shard_count_option: int | None = None,
                  env: Mapping[str, str] | None = None) -> ShardSpec | None:
    """--shard I/N if given (checked against --shard-count), else detect_shard(env). None: no shard.
    An empty --shard (an unset shell variable in `--shard "$X"`) is an error, not "no shard"."""
    if shard_option is not None:
        if not shard_option.strip():
            raise InputError(f"--shard {shard_option!r} is empty (an unset variable in the job script?): give "
                             "INDEX/COUNT, e.g. --shard 3/16, or leave --shard out to make every row")
        spec = parse_shard(shard_option)
        if shard_count_option is not None and shard_count_option != spec.count:
            raise InputError(f"--shard {shard_option} and --shard-count {shard_count_option} disagree: give one of them")
        return spec
    return detect_shard(env, shard_count_option)


def shard_device(spec: ShardSpec | None, requested: str) -> str:
    """--device as asked, except `auto` with CUDA and a local rank: cuda:<local rank mod visible GPUs>
    (under srun with one GPU bound per task that is cuda:0)."""
    if requested != "auto" or spec is None or spec.local_rank is None:
        return requested
    import torch

    if not torch.cuda.is_available():
        return requested
    return f"cuda:{spec.local_rank % torch.cuda.device_count()}"

