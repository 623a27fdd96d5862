"""Test support for the job-layer tests: serve the module's tiny pipeline to the CLI, and run the
CLI in-process."""
from __future__ import annotations

from typer.testing import CliRunner

from batchsd.cli import app
from batchsd.model.pipeline import Pipeline


def serve_tiny(monkeypatch, tiny_pipe) -> list[str]:
    """Make `Pipeline.load("tiny")` (CPU, fp32, no options) return the module's pipeline instead of
    building one.

    Returns the list of models asked for, in order, so a test can check what was loaded.
    """
    real_load = Pipeline.load.__func__
    calls: list[str] = []

    def load(cls, model, device="auto", dtype="auto", **options):
        calls.append(str(model))
        if str(model) == "tiny" and device in ("auto", "cpu") and dtype in ("auto", "fp32") and \
                all(value is None or value is False and name != "exact" for name, value in options.items()):
            return tiny_pipe
        return real_load(cls, model, device, dtype, **options)

    monkeypatch.setattr(Pipeline, "load", classmethod(load))
    return calls


def invoke(*args: str):
    """`batchsd ARGS` through the typer app; an exception other than the CLI's exit is re-raised, and
    the output never holds a traceback."""
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.output
    return result
