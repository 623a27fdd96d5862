"""Reading a `.ckpt` / `.pt` / `.bin` pickle without running code from it: `torch.load(weights_only=
True)` (tensors and plain containers only), plus the few inert globals that the checkpoints people
have carry beside their tensors, each read as data (as A1111's `modules/safe.py` allows them):

- `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`: the training callback's state that
  the original CompVis checkpoints hold under `callbacks` (sd-v1-4.ckpt); read into
  `LightningCallbackState`, a plain holder of its attributes: pytorch_lightning is never imported;
- `numpy.core.multiarray.scalar` / `numpy._core.multiarray.scalar` and `numpy.dtype`: numpy numbers in
  training metadata (`global_step`, scores), for numeric and boolean dtypes only (an object dtype is
  refused).

Anything else a pickle names is refused (`PickleRefused`, with the name), never called. torch's own
messages are not relayed: for a refused pickle they advise `weights_only=False`, the opposite of
batchsd's rule. Callers turn the two errors into their own (checkpoint, LoRA, embedding).
"""
from __future__ import annotations

import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from numpy._core.multiarray import scalar as _scalar          # numpy >= 2
except ImportError:   # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import scalar as _scalar


class PickleRefused(Exception):
    """The pickle names a global that is neither torch's allow-list nor this module's."""

    def __init__(self, global_name: str):
        super().__init__(global_name)
        self.global_name = global_name


class PickleUnreadable(Exception):
    """Not a readable PyTorch pickle (damaged, truncated, or not a pickle): `what` says which."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class LightningCallbackState:
    """PyTorch Lightning's ModelCheckpoint as pickled data: its attributes in `state`, no behaviour."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _numpy_scalar(dtype: np.dtype, data: Any = None):
    """numpy's pickled scalar, for dtypes that hold numbers only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"GLOBAL numpy.core.multiarray.scalar with dtype {dtype!r}")
    return _scalar(dtype, data)


_NUMERIC_DTYPES = [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"]
INERT_GLOBALS = [
    (LightningCallbackState, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (np.dtype, "numpy.dtype"),
    *_NUMERIC_DTYPES,            # what numpy.dtype(...) returns is BUILT: its class must be allowed too
]


def load_pickle(path: Path, mmap: bool = False) -> Any:
    """The pickle at `path` under the rule in the module docstring; `mmap` maps a zip-format file
    (the legacy pre-zip format is read whole). PickleRefused / PickleUnreadable otherwise."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(INERT_GLOBALS):
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or ("mmap" not in str(e) and "zipfile" not in str(e)):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise PickleUnreadable("its pickle data is damaged or is not a PyTorch state dict") from None
        raise PickleRefused(found.group(1)) from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error, IndexError, KeyError, TypeError) as e:
        zip_damage = isinstance(e, RuntimeError) and "zip archive" in str(e)
        raise PickleUnreadable("a damaged or truncated zip archive" if zip_damage else type(e).__name__) from None
