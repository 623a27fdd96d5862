"""Shard detection from --shard and each launcher's environment (SLURM array, srun, torchrun,
Kubernetes Indexed Job), malformed values, and the stable row -> shard assignment."""
from __future__ import annotations

from collections import Counter

import pytest

from batchsd.errors import InputError
from batchsd.job.shards import ShardSpec, shard_of
from batchsd.scale.launchers import detect_shard, parse_shard, resolve_shard, shard_device


def spec(env: dict, count: int | None = None) -> tuple[int, int] | None:
    s = detect_shard(env, count)
    return None if s is None else (s.index, s.count)


def raises(env: dict, *words: str, count: int | None = None) -> str:
    with pytest.raises(InputError) as e:
        detect_shard(env, count)
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------- --shard

@pytest.mark.parametrize("text,expected", [("0/1", (0, 1)), ("3/16", (3, 16)), (" 15 / 16 ", (15, 16))])
def test_parse_shard(text, expected):
    s = parse_shard(text)
    assert (s.index, s.count) == expected and s.source == "--shard"


@pytest.mark.parametrize("text", ["16/16", "-1/4", "a/b", "3", "0/0", "1/-2", "1.5/4", ""])
def test_parse_shard_rejects(text):
    with pytest.raises(InputError, match="--shard"):
        parse_shard(text)


def test_explicit_shard_beats_environment():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    s = resolve_shard("2/5", None, env)
    assert (s.index, s.count, s.source) == (2, 5, "--shard")
    assert resolve_shard(None, None, {}) is None
    with pytest.raises(InputError, match="disagree"):
        resolve_shard("2/5", 4, {})


def test_labels_name_files():
    assert ShardSpec(3, 16, "x").label == "00003-of-00016"
    assert ShardSpec(123456, 200000, "x").label == "123456-of-200000"
    with pytest.raises(InputError):
        ShardSpec(4, 4, "x")


# ----------------------------------------------------------------------------- SLURM array

def test_no_environment_no_shard():
    assert detect_shard({}) is None
    raises({}, "--shard-count 4", "--shard I/4", count=4)
    raises({"BATCHSD_SHARD_COUNT": "4"}, "$BATCHSD_SHARD_COUNT")


def test_slurm_array_dense_ranges():
    base = {"SLURM_ARRAY_TASK_COUNT": "16"}
    assert spec({**base, "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "15"}) == (5, 16)
    assert spec({**base, "SLURM_ARRAY_TASK_ID": "5"}) == (5, 16)                     # MIN defaults to 0
    assert spec({**base, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "16"}) == (0, 16)
    assert spec({**base, "SLURM_ARRAY_TASK_ID": "16", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "16"}) == (15, 16)
    # --array=0-30:2 is 16 tasks 0, 2, ..., 30: dense after dividing by the step
    stepped = {**base, "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "30", "SLURM_ARRAY_TASK_STEP": "2"}
    assert spec({**stepped, "SLURM_ARRAY_TASK_ID": "6"}) == (3, 16)
    assert spec({**stepped, "SLURM_ARRAY_TASK_ID": "30"}) == (15, 16)
    # COUNT missing (older SLURM): derived from MIN/MAX/STEP
    assert spec({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9",
                 "SLURM_ARRAY_TASK_STEP": "2"}) == (3, 5)
    s = detect_shard({**stepped, "SLURM_ARRAY_TASK_ID": "6"})
    assert "SLURM array" in s.source and "SLURM_ARRAY_TASK_ID=6" in s.source and "STEP=2" in s.source


def test_slurm_array_sparse_and_malformed():
    # --array=1,4,9: three tasks that are not one evenly stepped range
    sparse = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
              "SLURM_ARRAY_TASK_MAX": "9", "SLURM_ARRAY_TASK_STEP": "1"}
    raises(sparse, "COUNT=3", "--array=0-2", "--shard-count")
    # re-running chosen shards: with the total count given, the task id is the shard index
    assert spec(sparse, count=16) == (4, 16)
    assert spec({**sparse, "BATCHSD_SHARD_COUNT": "16"}) == (4, 16)
    raises({**sparse, "SLURM_ARRAY_TASK_ID": "16"}, "16", "0..N-1", count=16)
    # a task id off the step grid
    raises({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "16", "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": "30", "SLURM_ARRAY_TASK_STEP": "2"}, "SLURM_ARRAY_TASK_STEP=2")
    raises({"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "4"}, "$SLURM_ARRAY_TASK_ID='abc'", "whole number")
    raises({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "0"}, "$SLURM_ARRAY_TASK_COUNT", ">= 1")
    raises({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_STEP": "0", "SLURM_ARRAY_TASK_COUNT": "4"},
           "$SLURM_ARRAY_TASK_STEP")
    raises({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT", "--shard-count")
    raises({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, "beyond")
    assert spec({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, count=4) == (1, 4)


# ----------------------------------------------------------------------------- srun

def test_srun_tasks():
    step = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
    s = detect_shard(step)
    assert (s.index, s.count, s.local_rank) == (1, 4, 1) and "SLURM_PROCID=1" in s.source
    assert spec({**step, "SLURM_STEP_NUM_TASKS": "2"}) == (1, 2)  # the step's own task count wins
    assert spec({**step, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # one task: not sharded
    # the batch script itself (no srun step) has SLURM_PROCID=0 and SLURM_NTASKS=4: not split
    assert spec({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "77"}) is None
    raises({**step, "SLURM_PROCID": "4"}, "$SLURM_PROCID='4'", "0..3")
    raises({**step, "SLURM_NTASKS": "four"}, "$SLURM_NTASKS='four'")


def test_slurm_array_times_srun():
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4",
           "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    s = detect_shard(env)
    assert (s.index, s.count) == (7, 8)
    assert "SLURM array" in s.source and "srun" in s.source
    # every (task, proc) pair gets a distinct shard
    seen = {detect_shard({**env, "SLURM_ARRAY_TASK_ID": str(t), "SLURM_PROCID": str(p)}).index
            for t in range(4) for p in range(2)}
    assert seen == set(range(8))
    # with a total count the array task id is the index of a group of 2 shards: 6 shards = 3 groups
    raises(env, "is not below 3", count=6)
    assert spec(env, count=8) == (7, 8)


# ----------------------------------------------------------------------------- torchrun

def test_torchrun():
    env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}
    s = detect_shard(env)
    assert (s.index, s.count, s.local_rank) == (2, 4, 2) and s.source.startswith("torchrun")
    assert spec({"RANK": "0", "WORLD_SIZE": "1"}) == (0, 1)  # one process: the whole manifest
    raises({"RANK": "1"}, "$WORLD_SIZE is not set")
    raises({"WORLD_SIZE": "2"}, "$RANK is not set")
    raises({"RANK": "4", "WORLD_SIZE": "4"}, "$RANK=4", "$WORLD_SIZE=4")
    raises({"RANK": "0", "WORLD_SIZE": "two"}, "$WORLD_SIZE='two'")
    raises({"RANK": "0", "WORLD_SIZE": "0"}, "$WORLD_SIZE", ">= 1")
    raises(env, "does not match", count=8)


def test_torchrun_beats_srun():
    # srun torchrun --nnodes=2 --nproc-per-node=4: RANK is already global
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    s = detect_shard(env)
    assert (s.index, s.count, s.local_rank) == (5, 8, 1)
    assert "ignored srun" in s.source


# ----------------------------------------------------------------------------- Kubernetes

def test_kubernetes_indexed_job():
    assert spec({"JOB_COMPLETION_INDEX": "2", "BATCHSD_SHARD_COUNT": "4"}) == (2, 4)
    assert spec({"JOB_COMPLETION_INDEX": "2"}, count=4) == (2, 4)
    assert spec({"JOB_COMPLETION_INDEX": "2", "BATCHSD_SHARD_COUNT": "9"}, count=4) == (2, 4)  # option beats env
    raises({"JOB_COMPLETION_INDEX": "2"}, "BATCHSD_SHARD_COUNT", "completions")
    raises({"JOB_COMPLETION_INDEX": "4", "BATCHSD_SHARD_COUNT": "4"}, "JOB_COMPLETION_INDEX=4", "0..N-1")
    raises({"JOB_COMPLETION_INDEX": "x", "BATCHSD_SHARD_COUNT": "4"}, "$JOB_COMPLETION_INDEX='x'")
    raises({"JOB_COMPLETION_INDEX": "1", "BATCHSD_SHARD_COUNT": "0"}, "$BATCHSD_SHARD_COUNT", ">= 1")
    raises({"JOB_COMPLETION_INDEX": "1", "BATCHSD_SHARD_COUNT": "four"}, "$BATCHSD_SHARD_COUNT='four'")


def test_kubernetes_with_torchrun():
    # one pod per index, each a one-node torchrun of 2 processes: 4 indices x 2 = 8 shards
    one_node = {"JOB_COMPLETION_INDEX": "3", "BATCHSD_SHARD_COUNT": "8",
                "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert spec(one_node) == (7, 8)
    raises({**one_node, "BATCHSD_SHARD_COUNT": "7"}, "not a multiple")
    # a torchrun spanning the pods (JobSet): the index is the node rank of the same world
    spanning = {"JOB_COMPLETION_INDEX": "1", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    s = detect_shard(spanning)
    assert (s.index, s.count) == (5, 8) and "ignored JOB_COMPLETION_INDEX" in s.source


def test_slurm_array_and_kubernetes_together_is_ambiguous():
    raises({"JOB_COMPLETION_INDEX": "1", "BATCHSD_SHARD_COUNT": "4", "SLURM_ARRAY_TASK_ID": "1",
            "SLURM_ARRAY_TASK_COUNT": "4"}, "both", "--shard")


def test_device_follows_local_rank_only_for_auto():
    s = ShardSpec(1, 4, "torchrun", local_rank=1)
    assert shard_device(s, "cpu") == "cpu"
    assert shard_device(None, "auto") == "auto"
    import torch

    expected = f"cuda:{1 % torch.cuda.device_count()}" if torch.cuda.is_available() else "auto"
    assert shard_device(s, "auto") == expected


# ----------------------------------------------------------------------------- assignment

def test_assignment_is_a_pinned_function_of_the_id():
    # pinned values: changing the hash would move rows between shards of a running job
    assert [shard_of(i, 16) for i in ["00000", "00001", "cat", "r07"]] == [7, 15, 1, 8]
    ids = [f"row-{i}" for i in range(3000)]
    before = {i: shard_of(i, 8) for i in ids}
    grown = [f"new-{i}" for i in range(500)] + ids[::-1] + [f"more-{i}" for i in range(500)]
    after = {i: shard_of(i, 8) for i in grown}
    assert all(after[i] == before[i] for i in ids)  # adding rows (anywhere) moves none


def test_assignment_partitions_and_spreads_evenly():
    ids = [f"{i:05d}" for i in range(16000)]
    for n in (1, 3, 16):
        shards = [ShardSpec(k, n, "test") for k in range(n)]
        owners = [[s.index for s in shards if s.owns(i)] for i in ids[:2000]]
        assert all(len(o) == 1 for o in owners)  # every row in exactly one shard
        counts = Counter(shard_of(i, n) for i in ids)
        expected = len(ids) / n
        assert set(counts) == set(range(n))
        assert max(abs(c - expected) for c in counts.values()) < 0.1 * expected, counts
