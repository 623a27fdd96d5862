#!/bin/bash
# One node, K GPUs: torchrun starts K copies of `batchsd run`, copy r makes shard r of K on cuda:r.
#
#   jobs/torchrun_node.sh MANIFEST OUT [MODEL]          # K = the GPUs nvidia-smi lists, or NPROC=K
#
# torchrun is only a process launcher here: batchsd reads RANK/WORLD_SIZE (which shard) and
# LOCAL_RANK (which GPU) and opens no process group; the copies never talk to each other. Several
# nodes: run this once per node with torchrun --nnodes=N --node-rank=i --rdzv-endpoint=HOST:PORT
# instead of --standalone (RANK/WORLD_SIZE then span all nodes), or use jobs/slurm_array.sh.
#
# torchrun stops every copy as soon as one exits non-zero. batchsd exits 1 when some of its rows
# failed (they are recorded in the results; retrying them would not help), so the wrapper below
# turns 1 into 0 and `batchsd status` at the end reports the tally. A copy that crashes (killed,
# CUDA error) makes torchrun restart all of them (--max-restarts); each resumes where it stopped.
set -euo pipefail

MANIFEST=${1:?usage: jobs/torchrun_node.sh MANIFEST OUT [MODEL]}
OUT=${2:?usage: jobs/torchrun_node.sh MANIFEST OUT [MODEL]}
MODEL=${3:-${BATCHSD_MODEL:?give MODEL or set BATCHSD_MODEL to a SD 1.x checkpoint}}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC" -ge 1 ] || { echo "no GPU found: set NPROC=K" >&2; exit 2; }
BATCHSD=${BATCHSD:-batchsd}

torchrun --standalone --nproc-per-node="$NPROC" --max-restarts=2 --no-python \
    sh -c '"$0" run "$@"; rc=$?; [ "$rc" -eq 1 ] && exit 0; exit "$rc"' \
    "$BATCHSD" "$MANIFEST" --model "$MODEL" --out "$OUT"

# exit status: 0 every row ok, 1 some rows failed, 3 some rows not made yet (see `batchsd status --help`)
exec "$BATCHSD" status "$OUT"
