"""A run's metadata files: run.json (what the run is: manifest, limit, shard, model, engine, host),
written when it starts, and summary.json (what it did), written last as the done marker.

`batchsd status` reads run.json to find the job's manifest; a run clears its summary.json when it
starts, so the marker's presence means "the last run of this layout got through every row".
"""
from __future__ import annotations

import json
from pathlib import Path

from batchsd.job.atomic import atomic_write_bytes
from batchsd.job.layout import RunLayout, shard_dirs


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def write_run_meta(layout: RunLayout, meta: dict) -> None:
    _write_json(layout.meta_path, meta)


def read_json_objects(paths) -> dict[Path, dict]:
    """{path: content} of each path that holds a readable JSON object; a missing file, or one that is
    not a JSON object (hand-edited, truncated), is skipped."""
    found = {}
    for p in paths:
        try:
            meta = json.loads(Path(p).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            found[Path(p)] = meta
    return found


def read_run_metas(out_dir: Path) -> list[dict]:
    """Every readable run.json in OUT (the whole-manifest run's and each shard's), newest first."""
    out_dir = Path(out_dir)
    paths = [RunLayout(out_dir).meta_path] + [d / RunLayout(out_dir).meta_path.name for d in shard_dirs(out_dir).values()]
    return sorted(read_json_objects(paths).values(), key=lambda m: str(m.get("started_at", "")), reverse=True)


def write_summary(path: Path, summary: dict) -> None:
    _write_json(Path(path), summary)


def read_summary(path: Path) -> dict | None:
    """A done marker's content; None when it is absent or unreadable."""
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def clear_summary(path: Path) -> None:
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass
