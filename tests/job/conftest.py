"""Fixtures of the job-layer tests."""
from __future__ import annotations

import pytest

from cli_support import serve_tiny


@pytest.fixture
def cached_tiny(monkeypatch, tiny_pipe, tmp_path):
    """`--model tiny` served from the module's tiny pipeline (cli_support.serve_tiny), tmp_path as the
    working folder, no $BATCHSD_MODEL. Returns the models Pipeline.load is asked for, in order."""
    calls = serve_tiny(monkeypatch, tiny_pipe)
    monkeypatch.delenv("BATCHSD_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    return calls
