"""Which slice of a job a process makes: ShardSpec (index I of N) and the row -> shard rule.

A row belongs to shard `shard_of(row.id, N)` (sha256 of the id): a stable function of the id alone,
so adding or removing rows never moves the others, any machine computes the same split without
talking to the rest, and a row's image does not depend on N (seeds are per row). Where I/N comes
from (--shard, SLURM, torchrun, Kubernetes) is batchsd.scale.launchers' job.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from batchsd.errors import InputError

MIN_INDEX_WIDTH = 5


@dataclass(frozen=True)
class ShardSpec:
    index: int                      # 0 <= index < count
    count: int                      # >= 1
    source: str                     # where it came from, in words, for the log ("--shard", "SLURM array ...")
    local_rank: int | None = None   # process index on this node (LOCAL_RANK, SLURM_LOCALID): picks a GPU

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(f"shard {self.index}/{self.count} is out of range: need 0 <= index < count")

    @property
    def width(self) -> int:
        return max(MIN_INDEX_WIDTH, len(str(self.count - 1)))

    @property
    def label(self) -> str:
        """`00003-of-00016`: names this shard's files (results part, journal folder)."""
        return f"{self.index:0{self.width}d}-of-{self.count:0{self.width}d}"

    @property
    def is_whole(self) -> bool:
        return self.count == 1

    def owns(self, row_id: str) -> bool:
        return shard_of(row_id, self.count) == self.index

    def __str__(self) -> str:
        return f"shard {self.index}/{self.count} (from {self.source})"



def shard_of(row_id: str, n: int) -> int:
    """Which of n shards a row belongs to: stable across runs and machines (sha256 of the id).

    Domain-separated from the default seed (which also hashes the id), so shard and seed are unrelated.
    """
    if n < 1:
        raise ValueError(f"the number of shards must be >= 1, got {n}")
    digest = hashlib.sha256(b"batchsd-shard\0" + row_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % n
