"""Reading a checkpoint's tensors: a single file or a diffusers folder opened as a `Source`, the
tensors under original-layout keys with their shapes and dtypes, the data not read yet; then
`materialize` reads one tensor into its destination (checkpoint.load_model).

- `.safetensors`: the JSON header is parsed here (`_safetensors_index`); no file is mapped, each
  tensor is read with pread straight into its destination (or a reused scratch buffer when it
  needs converting).
- `.ckpt`/`.pt`/`.bin`: `torch.load(weights_only=True, mmap=True)` with the inert training metadata
  of safe_pickle.py; a pickle that needs anything else is refused (CheckpointError), never executed. Tensors at
  the top level or under `state_dict`. Each tensor's pages are dropped from the private mapping
  once copied (page_advice.PageDropper), so the mapping does not grow to the whole file.
- a diffusers folder (`unet/`, `vae/`, `text_encoder/`, each with `*.safetensors`, `.fp16`
  variants or a sharded index): its files' keys renamed to the original layout by
  `diffusers_layout`, and its components' config.json files (and scheduler/scheduler_config.json)
  read into `Source.configs`, which the model family treats as authoritative (family.py). The text
  encoder is renamed to the SD 2.x (OpenCLIP) layout when text_encoder/config.json says
  hidden_act "gelu" (SD 2.x's), else to the SD 1.x (CLIP) layout; OpenCLIP's fused q/k/v tensor
  is read from the three diffusers tensors (`SourceTensor.parts`).

Beside a single file, an A1111-style `<checkpoint stem>.yaml` (the LDM config) is read for its
`model.params.parameterization` (`Source.yaml_prediction_type`: "v" -> "v_prediction", absent ->
"epsilon"), the one place a single SD 2.x file can say it is a v-prediction model.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from batchsd.errors import CheckpointError
from batchsd.model.diffusers_layout import KEY_MAPS, fused_groups, is_transposed, original_shape
from batchsd.model.page_advice import PageDropper
from batchsd.model.safe_pickle import PickleRefused, PickleUnreadable, load_pickle
from batchsd.model.stable_diffusion import CLIP_PREFIX, ORIGINAL_PREFIX, SD2_PREFIX, SDXL_PREFIX

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# a diffusers folder's weight files, component -> file stems in order of preference (transformers
# saves text encoders as model.safetensors, older versions as pytorch_model.bin); text_encoder_2: SDXL
DIFFUSERS_WEIGHTS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                     "text_encoder": ("model", "pytorch_model"), "text_encoder_2": ("model", "pytorch_model")}
DIFFUSERS_REQUIRED = ("unet", "vae", "text_encoder")   # every folder's; text_encoder_2 makes it SDXL
# the config files of a diffusers folder that are read (when present): component -> file
DIFFUSERS_CONFIGS = {"unet": "unet/config.json", "vae": "vae/config.json",
                     "text_encoder": "text_encoder/config.json", "text_encoder_2": "text_encoder_2/config.json",
                     "scheduler": "scheduler/scheduler_config.json"}


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a checkpoint, not read yet (shape already in the original layout)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    raw: tuple[int, int] | None = None                # safetensors: (fd, byte offset) of its contiguous bytes
    read: Callable[[], torch.Tensor] | None = None    # .ckpt: a view of the file mapping, of `shape`
    parts: tuple["SourceTensor", ...] = ()            # a fused tensor: its row blocks, concatenated on dim 0
    transposed: bool = False                          # stored as the transpose of `shape` (2-D)


def _pread_into(out: torch.Tensor, fd: int, offset: int) -> torch.Tensor:
    """Read out.nbytes bytes at `offset` of an open file straight into a contiguous CPU tensor."""
    _pread_bytes(memoryview(out.reshape(-1).view(torch.uint8).numpy()), fd, offset)
    return out


def _pread_bytes(buffer: memoryview, fd: int, offset: int) -> None:
    """Fill `buffer` with the bytes at `offset` of an open file."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"unexpected end of file reading {len(buffer)} bytes at {offset}")
        done += n


class Source:
    """The tensors of a checkpoint (file or diffusers folder) under original-layout keys."""

    def __init__(self, path: Path, fmt: str, layout: str, files: list[Path]):
        self.path, self.format, self.layout, self.files = path, fmt, layout, files
        self.tensors: dict[str, SourceTensor] = {}
        self.configs: dict[str, dict] = {}          # diffusers folder: DIFFUSERS_CONFIGS component -> its JSON
        self.yaml_path: Path | None = None          # single file: the `<stem>.yaml` beside it, if any
        self.yaml_prediction_type: str | None = None  # what that yaml says ("epsilon" | "v_prediction")
        self.skipped: list[str] = []  # non-tensor entries of a pickled state dict
        self.fds: list[int] = []
        self.identity_files: list[Path] = files      # what the model's sha256 is computed over
        self._scratch: dict[str, torch.Tensor] = {}
        self.drop_pages: Callable[[torch.Tensor], None] = lambda t: None

    def add_file(self, path: Path, rename: Callable[[list[str]], dict[str, str]], layout: str | None) -> None:
        """Add one file's tensors; `layout` names the diffusers_layout KEY_MAPS layout its keys have (or
        None: the original layout)."""
        fix_shape = (lambda key, shape: shape) if layout is None else \
            (lambda key, shape: original_shape(layout, key, shape))
        transposed = (lambda key: False) if layout is None else (lambda key: is_transposed(layout, key))
        if _sniff(path) == "safetensors":
            fd = os.open(path, os.O_RDONLY)
            self.fds.append(fd)
            for old, new, shape, dtype, offset in _safetensors_index(path, rename):
                # a renamed diffusers tensor has the same bytes, only (maybe) another shape or transposed
                if transposed(new):
                    self.tensors[new] = SourceTensor(tuple(reversed(shape)), dtype, raw=(fd, offset), transposed=True)
                else:
                    self.tensors[new] = SourceTensor(fix_shape(new, shape), dtype, raw=(fd, offset))
        else:
            tensors, skipped = _flat_tensors(_torch_load(path), path)
            self.skipped += skipped
            for old, new in rename(list(tensors)).items():
                t = tensors[old]
                if transposed(new):
                    self.tensors[new] = SourceTensor(tuple(reversed(t.shape)), t.dtype, read=lambda t=t: t.t())
                else:
                    shape = fix_shape(new, tuple(t.shape))
                    self.tensors[new] = SourceTensor(shape, t.dtype, read=lambda t=t, s=shape: t.view(s))

    def fuse_parts(self) -> None:
        """Keys `<key>::<i>` (diffusers_layout.FUSED_PART) -> one tensor `<key>` of those row blocks."""
        try:
            groups = fused_groups(list(self.tensors))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        for base, keys in groups.items():
            parts = tuple(self.tensors.pop(k) for k in keys)
            if base in self.tensors or len({(p.shape[1:], p.dtype) for p in parts}) != 1:
                raise CheckpointError(f"{self.path}: the parts of {base} do not fit together: "
                                      f"{[(p.shape, str(p.dtype)) for p in parts]}")
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            self.tensors[base] = SourceTensor(shape, parts[0].dtype, parts=parts)

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype, slot: str = "tensor") -> torch.Tensor:
        """A reused CPU buffer, one per slot, grown when too small: "tensor" for whole tensors (sized
        once for the largest); "chunk", "fp32" and "converted" for the steps of `_read_converted`."""
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._scratch.get(slot)
        if buffer is None or buffer.numel() < nbytes:
            if slot == "tensor":
                nbytes = max([nbytes] + [math.prod(t.shape) * t.dtype.itemsize
                                         for t in self.tensors.values() if not t.parts])
            buffer = self._scratch[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)

    def close(self) -> None:
        self._scratch.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.tensors.clear()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sniff(path: Path) -> str:
    """File format from its first bytes: "safetensors" or "torch" (zip or legacy pickle)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(f"{path}: neither a safetensors file nor a PyTorch checkpoint (first bytes {head!r})")


def _safetensors_index(path: Path, rename: Callable[[list[str]], dict[str, str]]):
    """(old key, new key, shape, dtype, absolute byte offset) of each tensor, from the file's JSON header.

    The data is then read with pread straight into the destination tensors: no mapping of the file
    (whose pages would count as this process's memory) and a single copy out of the page cache.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, 1 << 28):
            raise CheckpointError(f"{path}: not a valid safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a valid safetensors file (header: {e})") from None
        except RecursionError:
            raise CheckpointError(f"{path}: not a valid safetensors file (its JSON header is nested too deeply "
                                  "to be a tensor index)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    _check_data_layout(path, header)
    start = 8 + header_len
    for old, new in rename(list(header)).items():
        try:
            entry = header[old]
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file (entry {old!r}: {e!r})") from None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {old} has unsupported dtype {entry['dtype']}")
        if end - begin != math.prod(shape) * dtype.itemsize or start + end > size:
            raise CheckpointError(f"{path}: tensor {old} has inconsistent offsets {begin}..{end} (file truncated?)")
        yield old, new, shape, dtype, start + begin


def _check_data_layout(path: Path, header: dict) -> None:
    """The tensors' byte ranges follow one another with no overlap and no gap, from byte 0 of the data,
    as the safetensors library requires (two tensors sharing bytes would load silently wrong)."""
    try:
        ranges = sorted((int(e["data_offsets"][0]), int(e["data_offsets"][1]), key) for key, e in header.items())
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file (an entry without data_offsets: {e!r})") from None
    position = 0
    for begin, end, key in ranges:
        if begin != position or end < begin:
            raise CheckpointError(f"{path}: not a valid safetensors file: tensor {key} takes bytes {begin}..{end} of "
                                  f"the data where the tensors before it end at {position} (overlapping or "
                                  "missing data); re-download the file")
        position = end


def _torch_load(path: Path) -> Any:
    """The pickle's objects by safe_pickle's rule (tensors, plain containers, inert training
    metadata), mapped when the file format allows; CheckpointError naming the cause otherwise."""
    try:
        return load_pickle(path, mmap=True)
    except PickleRefused as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle needs more than tensors and plain containers (it references "
            f"{e.global_name}). batchsd never runs code from a checkpoint; use a .safetensors version of this "
            "model, or convert it with a tool you trust.") from None
    except PickleUnreadable as e:
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({e.what}); re-download the file, or "
                              "use a .safetensors version") from None


def _flat_tensors(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensor dict of a loaded pickle (inside `state_dict` when present) and the non-tensor entries."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    return tensors, skipped


def _single_file_rename(keys: list[str]) -> dict[str, str]:
    """Original layout as is; very old files lack the `text_model.` level of the text encoder."""
    old_clip = "cond_stage_model.transformer."
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return {k: k for k in keys}
    return {k: CLIP_PREFIX + k[len(old_clip):] if k.startswith(old_clip) else k for k in keys}


def _diffusers_weight_files(folder: Path, stems: Iterable[str]) -> tuple[list[Path], list[str] | None]:
    """A component's weight files (the first stem that has any: full precision first, then the fp16
    variant) and, for a sharded component, all its keys from the index (the UNet mapping needs every
    key to count blocks)."""
    for stem in stems:
        files, keys = _diffusers_stem_files(folder, stem)
        if files:
            return files, keys
    return [], None


def _diffusers_stem_files(folder: Path, stem: str) -> tuple[list[Path], list[str] | None]:
    for name, index_name in ((f"{stem}.safetensors", f"{stem}.safetensors.index.json"),
                             (f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.fp16.json"),
                             (f"{stem}.bin", f"{stem}.bin.index.json"),
                             (f"{stem}.fp16.bin", f"{stem}.bin.index.fp16.json")):
        if (folder / name).is_file():
            return [folder / name], None
        # a sharded index: "<name>.index.json"; diffusers names a variant's "<stem>.safetensors.index.fp16.json"
        index = next((folder / n for n in (f"{name}.index.json", index_name) if (folder / n).is_file()), None)
        if index is not None:
            weight_map = _weight_map(index)
            return [folder / shard for shard in sorted(set(weight_map.values()))], list(weight_map)
    return [], None


def _weight_map(index: Path) -> dict[str, str]:
    """The `weight_map` of a sharded component's index (key -> shard file in the same folder)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid weight index ({type(e).__name__}: {str(e)[:200]}); "
                              "re-download that file") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v and "/" not in v and v not in (".", "..")
            for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: not a valid weight index (`weight_map` must map tensor names to "
                              "file names in the same folder); re-download that file")
    return weight_map


def _diffusers_rename(keys: list[str], layout: str, prefix: str, key_map: dict[str, str] | None) -> dict[str, str]:
    key_map = key_map if key_map is not None else KEY_MAPS[layout](keys)
    return {k: prefix + key_map.get(k, k) for k in keys}


def diffusers_configs(folder: Path) -> dict[str, dict]:
    """The folder's DIFFUSERS_CONFIGS files that exist, parsed (CheckpointError when one is not JSON)."""
    configs = {}
    for component, name in DIFFUSERS_CONFIGS.items():
        file = folder / name
        if file.is_file():
            try:
                value = json.loads(file.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{file}: not valid JSON ({e})") from None
            if not isinstance(value, dict):
                raise CheckpointError(f"{file}: not a JSON object")
            configs[component] = value
    return configs


def is_sd2_folder(configs: Mapping[str, dict]) -> bool:
    """Whether a diffusers folder's text encoder is SD 2.x's (OpenCLIP ViT-H, GELU) rather than
    SD 1.x's CLIP ViT-L (QuickGELU): what its text_encoder/config.json says."""
    return configs.get("text_encoder", {}).get("hidden_act") == "gelu"


def _diffusers_plan(folder: Path, configs: Mapping[str, dict]) -> list[tuple[Path, Callable, str]]:
    """(file, rename, layout) for each weight file of a diffusers folder: an SDXL folder (with
    text_encoder_2/) has its encoders renamed to sgm's layout (CLIP ViT-L as is, OpenCLIP ViT-bigG to
    OpenCLIP names), an SD 2.x folder its encoder to OpenCLIP names, an SD 1.x folder to CLIP's."""
    missing = [c + "/" for c in DIFFUSERS_REQUIRED if not (folder / c).is_dir()]
    if missing:
        present = [c + "/" for c in DIFFUSERS_REQUIRED if c + "/" not in missing]
        what = f"it has {', '.join(present)} but no {', '.join(missing)}" if present else "it has none of them"
        raise CheckpointError(f"{folder}: a folder must be a diffusers model folder with "
                              f"{', '.join(c + '/' for c in DIFFUSERS_REQUIRED)} subfolders; {what}")
    sdxl = (folder / "text_encoder_2").is_dir()
    sd2 = not sdxl and is_sd2_folder(configs)
    prefixes = SDXL_PREFIX if sdxl else SD2_PREFIX if sd2 else ORIGINAL_PREFIX
    plan = []
    for component, prefix in prefixes.items():
        stems = DIFFUSERS_WEIGHTS[component]
        files, all_keys = _diffusers_weight_files(folder / component, stems)
        if not files:
            raise CheckpointError(f"{folder / component}: no {stems[0]}.safetensors (or .fp16.safetensors, "
                                  f"{stems[-1]}.bin) weights")
        layout = ("text_encoder_openclip" if (sd2 and component == "text_encoder") or component == "text_encoder_2"
                  else component)
        key_map = KEY_MAPS[layout](all_keys) if all_keys else None
        plan += [(f, partial(_diffusers_rename, layout=layout, prefix=prefix, key_map=key_map), layout)
                 for f in files]
    return plan


def _yaml_scalar(text: str) -> str:
    value = text.split(" #", 1)[0].strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return value


def read_ldm_yaml(path: Path) -> str:
    """The prediction type an LDM/A1111 config file gives its model: `model.params.parameterization`
    "v" -> "v_prediction"; absent (or "eps") -> "epsilon". A small reader of block-style YAML
    mappings (what these files are), so that no YAML library is needed; CheckpointError for any
    other parameterization."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the model's config file ({e})") from None
    stack: list[tuple[int, str]] = []   # (indent, key) of the mappings that contain the current line
    found = None
    has_params = False
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-", "---")) or ":" not in stripped:
            continue
        if "\t" in line[:len(line) - len(line.lstrip())]:
            raise CheckpointError(f"{path}: line {n} is indented with a tab, which YAML does not allow; indent "
                                  "with spaces")
        indent = len(line) - len(line.lstrip(" "))
        key, _, rest = stripped.partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path_keys = [k for _, k in stack] + [key.strip()]
        has_params = has_params or path_keys == ["model", "params"]
        if path_keys == ["model", "params", "parameterization"]:
            found = _yaml_scalar(rest)
        if not _yaml_scalar(rest):
            stack.append((indent, key.strip()))
    if not has_params:   # an empty or cut file must not pass for an epsilon model's config
        raise CheckpointError(f"{path}: not an LDM model config (no model: params: mapping), so it cannot say the "
                              "checkpoint's prediction type; replace it with the model's own .yaml, or remove it (an "
                              "SD 2.x file then needs --prediction-type)")
    if found is None or found == "eps":
        return "epsilon"
    if found == "v":
        return "v_prediction"
    raise CheckpointError(f"{path}: model.params.parameterization {found!r} is not supported "
                          f"(\"eps\" or \"v\")")


def open_checkpoint(path: str | Path) -> Source:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        configs = diffusers_configs(path)
        plan = _diffusers_plan(path, configs)
        files = sorted((f for f, _, _ in plan), key=lambda f: str(f.relative_to(path)))
        source = Source(path, "diffusers", "diffusers", files)
        source.configs = configs
        # the model's identity (its sha256) covers the config files read, which change what loads
        source.identity_files = sorted([*files, *(path / name for name in DIFFUSERS_CONFIGS.values()
                                                  if (path / name).is_file())],
                                       key=lambda f: str(f.relative_to(path)))
    else:
        plan = [(path, _single_file_rename, None)]
        source = Source(path, "safetensors" if _sniff(path) == "safetensors" else "ckpt", "single-file", [path])
        yaml_path = path.with_suffix(".yaml")
        if yaml_path.is_file():
            source.yaml_path, source.yaml_prediction_type = yaml_path, read_ldm_yaml(yaml_path)
    try:
        for file, rename, component in plan:
            source.add_file(file, rename, component)
        source.fuse_parts()
    except BaseException:
        source.close()
        raise
    source.drop_pages = PageDropper(source.files)
    return source


def materialize(source: Source, key: str, dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format) -> torch.Tensor:
    """One tensor in the target dtype/device (4-D ones in `memory_format`), freshly allocated; the
    buffers on the side (Source.scratch) are reused."""
    out = empty_for(source, key, dtype, device, memory_format)
    read_into(source, key, out)
    return out


def empty_for(source: Source, key: str, dtype: torch.dtype, device: torch.device,
              memory_format: torch.memory_format) -> torch.Tensor:
    """An uninitialized tensor for `key` in the target dtype/device (4-D ones in `memory_format`)."""
    shape = source.tensors[key].shape
    return torch.empty(shape, dtype=dtype, device=device,
                       memory_format=memory_format if len(shape) == 4 else torch.contiguous_format)


def read_into(source: Source, key: str, out: torch.Tensor) -> None:
    """The tensor `key` into `out` (an `empty_for` tensor), converted to its dtype, device and layout."""
    _read_into(source, source.tensors[key], out)


def _read_into(source: Source, t: SourceTensor, out: torch.Tensor) -> None:
    """The bytes of `t` into `out` (its shape), converted to out's dtype and device."""
    if t.parts:  # row blocks of a fused tensor, each into its rows of `out` (contiguous slices)
        row = 0
        for part in t.parts:
            _read_into(source, part, out[row:row + part.shape[0]])
            row += part.shape[0]
    elif t.transposed and t.raw is not None:   # read as stored, then written transposed
        out.copy_(_pread_into(source.scratch(t.shape[::-1], t.dtype), *t.raw).t())
    elif t.raw is None:  # .ckpt: a view of the file mapping
        view = t.read()
        if out.device.type == "cpu" and view.dim() > 0:
            _read_converted(source, t, out, view)
        else:
            out.copy_(view)
        source.drop_pages(view)
    elif t.dtype == out.dtype and out.device.type == "cpu" and out.is_contiguous():
        _pread_into(out, *t.raw)  # file -> model tensor, no intermediate
    elif out.device.type == "cpu" and len(t.shape) > 0:
        _read_converted(source, t, out)
    else:
        out.copy_(_pread_into(source.scratch(t.shape, t.dtype), *t.raw))


# elements per chunk of `_read_converted`: its file bytes and their fp32 copy stay in L2 while converted
CONVERT_CHUNK = 1 << 17
HALF_FLOATS = (torch.float16, torch.bfloat16)


def _read_converted(source: Source, t: SourceTensor, out: torch.Tensor, view: torch.Tensor | None = None) -> None:
    """`t` into CPU tensor `out` of another dtype or layout, in blocks of rows converted while in
    cache, not the whole tensor through memory twice: each block read into a small buffer (`t` stored
    contiguous, safetensors) or taken from `view` (.ckpt: the tensor in the file mapping).
    Each step is a copy torch vectorizes: fp16 <-> bf16 goes through fp32 (torch converts between the
    two 16-bit floats one element at a time, to and from fp32 vectorized; the rounding is the same,
    fp16 -> fp32 being exact), and a change of layout (channels_last) is done in out's dtype, after
    the conversion (a copy that converts and permutes at once runs element by element)."""
    row = math.prod(t.shape[1:])
    rows_per_chunk = max(1, min(t.shape[0], CONVERT_CHUNK // max(row, 1)))
    block = (rows_per_chunk, *t.shape[1:])
    # the buffers' views made once per tensor, not per block (the last block takes their first rows)
    if view is None:
        fd, offset = t.raw
        read = source.scratch(block, t.dtype, "chunk")
        read_bytes = memoryview(read.view(-1).view(torch.uint8).numpy())
    via_fp32 = source.scratch(block, torch.float32, "fp32") \
        if t.dtype != out.dtype and t.dtype in HALF_FLOATS and out.dtype in HALF_FLOATS else None
    # a layout change (channels_last) is done after the conversion, in out's dtype
    converted = source.scratch(block, out.dtype, "converted") \
        if not out.is_contiguous() and t.dtype != out.dtype else None
    row_bytes = row * t.dtype.itemsize
    for first in range(0, t.shape[0], rows_per_chunk):
        n = min(rows_per_chunk, t.shape[0] - first)
        if view is None:
            _pread_bytes(read_bytes[:n * row_bytes], fd, offset + first * row_bytes)
            chunk = read[:n]
        else:
            chunk = view[first:first + n]
        for step in (via_fp32, converted):
            if step is not None:
                chunk = step[:n].copy_(chunk)
        out[first:first + n].copy_(chunk)
