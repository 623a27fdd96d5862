"""Fixtures shared by the model tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: their ops are too small to gain from more,
    and on a shared 2-core machine extra OpenMP threads only contend. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def parity_figures():
    """The parity figures the modules gathered (image_parity.FIGURES), printed at the end of the session
    (pytest -s shows them)."""
    from image_parity import FIGURES

    yield
    if FIGURES:
        print("\n" + "\n".join(FIGURES))
