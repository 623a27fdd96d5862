"""Shared fixtures for the job-layer tests: one tiny pipeline per test module, served to the CLI."""
from __future__ import annotations

import pytest
import torch

from batchsd.pipeline import Pipeline


@pytest.fixture(scope="module")
def tiny_pipe():
    # One intra-op thread: the tiny model's ops are too small to gain from more, and on a shared
    # 2-core machine extra OpenMP threads make it several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Pipeline.load("tiny", device="cpu", dtype="fp32")
    torch.set_num_threads(threads)


def serve_tiny(monkeypatch, tiny_pipe) -> list[str]:
    """Make `Pipeline.load("tiny")` (CPU, fp32) return the module's pipeline instead of building one.

    Returns the list of models asked for, in order, so a test can check what was loaded.
    """
    real_load = Pipeline.load.__func__
    calls: list[str] = []

    def load(cls, model, device="auto", dtype="auto", low_memory=False):
        calls.append(str(model))
        if str(model) == "tiny" and device in ("auto", "cpu") and dtype in ("auto", "fp32"):
            return tiny_pipe
        return real_load(cls, model, device, dtype, low_memory)

    monkeypatch.setattr(Pipeline, "load", classmethod(load))
    return calls
