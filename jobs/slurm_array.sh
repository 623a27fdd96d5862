#!/bin/bash
# A manifest's images from a SLURM job array: 16 array tasks, one GPU each, one shared --out.
#
#   sbatch jobs/slurm_array.sh MANIFEST OUT [MODEL]
#   sbatch --dependency=afterany:<jobid> --wrap "batchsd status OUT"     # the tally once all are done
#
# Array task k makes the rows whose shard_of(id, 16) == k: batchsd reads SLURM_ARRAY_TASK_ID and
# SLURM_ARRAY_TASK_COUNT (ids map densely, so --array=1-16 or 0-30:2 work too). The tasks never talk:
# each writes its own images/<id>.png, results/part-000kk-of-00016.parquet and .batchsd/shard-000kk-of-00016/,
# so OUT must be on a filesystem every node sees (NFS, Lustre, GPFS, ...).
#
# Re-submitting the same script resumes: finished rows are skipped, each task on its own.
# Re-running only some shards, e.g. 3 and 7 of 16 (the task id is then the shard index):
#   sbatch --array=3,7 --export=ALL,BATCHSD_SHARD_COUNT=16 jobs/slurm_array.sh MANIFEST OUT
#
# More processes per task: with `#SBATCH --ntasks=2 --gpus-per-task=1` and `srun batchsd run ...` below,
# the array and srun combine (16 tasks x 2 = 32 shards).
#SBATCH --job-name=batchsd
#SBATCH --array=0-15%8
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=batchsd-%A_%a.out
#SBATCH --signal=B:TERM@120
# --signal: SIGTERM two minutes before the time limit; batchsd finishes its batch, writes its results
# and exits 143, and the next submission resumes from there.
set -euo pipefail

MANIFEST=${1:?usage: sbatch jobs/slurm_array.sh MANIFEST OUT [MODEL]}
OUT=${2:?usage: sbatch jobs/slurm_array.sh MANIFEST OUT [MODEL]}
MODEL=${3:-${BATCHSD_MODEL:?give MODEL or set BATCHSD_MODEL to a SD 1.x checkpoint}}

# exec: batchsd is the batch shell itself, so it receives the --signal SIGTERM.
# Exit status: 0 all of this shard's rows ok, 1 some rows failed (recorded in the results), 2 usage error.
exec batchsd run "$MANIFEST" --model "$MODEL" --out "$OUT"
