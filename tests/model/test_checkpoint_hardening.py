"""Broken checkpoints are one-line errors (exit 2), never tracebacks, library warnings or torch's
advice to load with weights_only=False: a corrupt pickle, a damaged zip, a safetensors header of
deeply nested JSON, a malformed diffusers weight index."""
from __future__ import annotations

import io
import random
import struct

import pytest
import torch
from typer.testing import CliRunner

from batchsd.cli import app


def _bad_files(tmp_path):
    rng = random.Random(0)
    (tmp_path / "random.ckpt").write_bytes(b"\x80\x04" + bytes(rng.randrange(256) for _ in range(5000)))
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(3)}, buf)
    (tmp_path / "halfzip.ckpt").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    header = ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    (tmp_path / "nested.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    folder = tmp_path / "badindex"
    for sub in ("unet", "vae", "text_encoder"):
        (folder / sub).mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    return {"random.ckpt": "pickle data is damaged", "halfzip.ckpt": "damaged or truncated zip archive",
            "nested.safetensors": "nested too deeply", "badindex": "not a valid weight index"}


@pytest.mark.parametrize("command", ["inspect", "run"])
def test_broken_checkpoints_are_clear_errors(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("id,prompt\na,a cat\n")
    for name, reason in _bad_files(tmp_path).items():
        args = ["inspect", name] if command == "inspect" else ["run", "m.csv", "--model", name, "--out", "o"]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, (name, r.output)
        assert isinstance(r.exception, SystemExit), (name, r.exception)
        assert reason in r.output, (name, r.output)
        assert "weights_only" not in r.output and "Warning" not in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o" / "images").exists()
