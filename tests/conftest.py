"""Shared fixtures for the job-layer tests: one tiny pipeline per test module (see cli_support.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from batchsd.model.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))  # tokenizer_build, a tool the tokenizer tests run

collect_ignore = ["bench", "tools"]  # benchmarks, not tests: run them as scripts (tests/bench/README.md, docs/performance.md)


@pytest.fixture(scope="module")
def tiny_pipe():
    # One intra-op thread: the tiny model's ops are too small to gain from more, and on a shared
    # 2-core machine extra OpenMP threads make it several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Pipeline.load("tiny", device="cpu", dtype="fp32")
    torch.set_num_threads(threads)
