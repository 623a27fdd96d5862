"""Shared fixtures for the job-layer tests: one tiny pipeline per test module (see cli_support.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from batchsd.model.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))  # tokenizer_build, a tool the tokenizer tests run

collect_ignore = ["bench", "tools"]  # benchmarks, not tests: run them as scripts (tests/bench/README.md, docs/performance.md)


@pytest.fixture(scope="session", autouse=True)
def private_hash_cache(tmp_path_factory):
    """The checkpoint hash cache (batchsd/model/hash_cache.py) in a folder of this test session, not the
    user's ~/.cache (subprocesses inherit it)."""
    import os

    from batchsd.model.hash_cache import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("hash-cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="module")
def tiny_pipe():
    # One intra-op thread: the tiny model's ops are too small to gain from more, and on a shared
    # 2-core machine extra OpenMP threads make it several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Pipeline.load("tiny", device="cpu", dtype="fp32")
    torch.set_num_threads(threads)
