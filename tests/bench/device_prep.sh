#!/usr/bin/env bash
# Run HERE, once per checkout, before `bash tests/bench/device_gpu.sh` goes to the device tool's GPU
# machine. That machine has PyTorch, transformers, safetensors, pyarrow, typer, rich and pytest, but
# no diffusers, and it gets the repository alone (not ../shared). This fills .devbench/ (ignored
# through .git/info/exclude, so it travels only when `carry` names it) with:
#   - the diffusers wheel (pure Python; the version of this venv, for the same reference code)
#   - ../shared/reference/sd15_keys.json, the key list the random benchmark checkpoint is built from
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF '/.devbench/' .git/info/exclude 2>/dev/null || echo '/.devbench/' >> .git/info/exclude
mkdir -p .devbench
version=$(python3 -c "import importlib.metadata as m; print(m.version('diffusers'))")
rm -f .devbench/diffusers-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d .devbench "diffusers==$version"
install -m 644 ../shared/reference/sd15_keys.json .devbench/
ls -la .devbench
du -sh .devbench
