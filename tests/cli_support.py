"""Test support for the job-layer tests: serve the module's tiny pipeline to the CLI."""
from __future__ import annotations

from batchsd.model.pipeline import Pipeline


def serve_tiny(monkeypatch, tiny_pipe) -> list[str]:
    """Make `Pipeline.load("tiny")` (CPU, fp32) return the module's pipeline instead of building one.

    Returns the list of models asked for, in order, so a test can check what was loaded.
    """
    real_load = Pipeline.load.__func__
    calls: list[str] = []

    def load(cls, model, device="auto", dtype="auto", low_memory=False, compile=None, winograd=None):
        calls.append(str(model))
        if str(model) == "tiny" and device in ("auto", "cpu") and dtype in ("auto", "fp32") and not compile \
                and not winograd:
            return tiny_pipe
        return real_load(cls, model, device, dtype, low_memory, compile, winograd)

    monkeypatch.setattr(Pipeline, "load", classmethod(load))
    return calls
