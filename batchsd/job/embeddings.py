"""A row's textual-inversion embeddings: the files in `--embeddings-dir` (default weights/embeddings/)
whose names its prompt or negative prompt uses, found before any model loads.

As in A1111, every embedding file in the folder (not its subfolders) is active: a prompt names one by
the file's stem, under either prompt syntax, with model/prompt_syntax.embedding_pattern's rule
(case-insensitive, no letter right before or after). A row that names some gets, in its conditioning,
((absolute path, vector count, sha256 of the file), ...) in order of first use: part of its
params_hash (a changed file makes the row again), the Pipeline's GenerationRow.embeddings, the
results' `embeddings` column (`name:hash12;...`) and the PNG's `TI hashes` (A1111's: the file's
sha256, 12 hex digits). A file that cannot be read, or whose name two files share, is a problem of
each row that names it, with the prompt column and the fix; so is an embedding with one table for a
row whose model is SDXL (two text encoders), or with SDXL's two tables for an SD 1.x/2.x row, where
the row's model is known before loading (`generation_of`). Its width is checked when the Pipeline
encodes the row: that row fails with the reason, the others go on.

The folder is listed without torch; torch is imported only to read the files a row names.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from batchsd.job.present import file_sha256
from batchsd.job.rows import JobRow
from batchsd.model.prompt_syntax import embedding_pattern

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")   # model/embeddings.read_embedding's layouts
DEFAULT_EMBEDDINGS_DIR = Path("weights") / "embeddings"


def embedding_files(folder: Path) -> dict[str, list[Path]]:
    """The folder's embedding files by stem (a list: two files may share one)."""
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file():
                found.setdefault(path.stem, []).append(path.resolve())
    return found


def resolve_embeddings(rows: list[JobRow], folder: Path | None, generation_of=None
                       ) -> tuple[list[JobRow], dict[int, list[tuple[str, str]]]]:
    """(rows with the embeddings they name in their conditioning, {data row index: [(column, message)]}
    for names that do not resolve, or whose tables do not fit the row's model: `generation_of(row)`,
    "SD 1.x" | "SD 2.x" | "SDXL", or None where unknown)."""
    folder = Path(folder) if folder is not None else DEFAULT_EMBEDDINGS_DIR
    files = embedding_files(folder)
    pattern = embedding_pattern(files)
    if pattern is None:
        return rows, {}
    by_lower = {name.lower(): name for name in files}
    known: dict[str, tuple[str, int, str] | str] = {}   # name -> (path, vectors, sha256), or the problem
    two_tables: dict[str, bool] = {}                     # name -> whether it is SDXL's (clip_l + clip_g)

    def entry(name: str) -> tuple[str, int, str] | str:
        if name not in known:
            paths = files[name]
            if len(paths) > 1:
                known[name] = (f"embedding name {name!r} matches {len(paths)} files in {folder}/ "
                               f"({', '.join(p.name for p in paths)}): rename one")
            else:
                from batchsd.model.embeddings import EmbeddingError, load_embedding   # torch, when named

                try:
                    embedding = load_embedding(paths[0])
                    known[name] = (str(paths[0]), embedding.vectors, file_sha256(paths[0]))
                    two_tables[name] = len(embedding.tables) > 1
                except EmbeddingError as e:
                    known[name] = (f"{e}: replace the file, or move it out of {folder}/ (every embedding there "
                                   "is active)")
        return known[name]

    out: list[JobRow] = []
    problems: dict[int, list[tuple[str, str]]] = {}
    for row in rows:
        named: dict[str, tuple[str, int, str]] = {}
        generation = generation_of(row) if generation_of is not None else None
        for column, text in (("prompt", row.prompt), ("negative_prompt", row.negative_prompt)):
            for match in pattern.findall(text):
                name = by_lower[match.lower()]
                found = entry(name)
                if isinstance(found, str):
                    problems.setdefault(row.data_row - 1, []).append((column, found))
                elif generation is not None and two_tables[name] != (generation == "SDXL"):
                    kind = "SDXL (clip_l + clip_g tables)" if two_tables[name] else "SD 1.x/2.x (one table)"
                    problems.setdefault(row.data_row - 1, []).append((column, (
                        f"embedding {name!r} ({found[0]}) is for {kind}, and this row's model is {generation}: "
                        f"use one made for {generation}, or make the row with another model (model column or "
                        "--model)")))
                else:
                    named.setdefault(name, found)
        out.append(replace(row, conditioning={**row.conditioning, "embeddings": tuple(named.values())})
                   if named else row)
    return out, problems


def embedding_record(entries) -> str | None:
    """The results' `embeddings` value: `name:hash12` entries joined by ';' (None: no embedding)."""
    if not entries:
        return None
    return ";".join(f"{Path(path).stem}:{sha[:12]}" for path, _, sha in entries)
