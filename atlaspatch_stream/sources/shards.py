"""Which slides a process takes: stable shards of the output stem, big slides first, and the order to steal in.

A slide's identity is its output stem (`sources.discover.stem_for`): the name of its H5 and of its claim, the same
whichever machine lists the folder, from whatever mount point, in whatever order. Its shard is a SHA-256 of that
stem modulo the shard count, so shards never depend on the listing and a slide added later does not move the
others. Pure: sizes come in as numbers, nothing here touches a file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..items import SlideJob

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 ≤ index < count).

    Raises:
        ValueError: a count below 1 or an index outside [0, count).
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"{self}: the shard count must be at least 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"{self}: the shard index must be between 0 and {self.count - 1} (0-based)")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N` as typed after `--shard`.

        Raises:
            ValueError: malformed (one line naming the value and the expected form), or out of range.
        """
        match = _SHARD.match(text)
        if match is None:
            raise ValueError(f"{text!r}: expected I/N, shard I (0-based) of N, e.g. 0/4")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, stem: str) -> bool:
        """Whether the slide with output stem `stem` belongs to this shard."""
        return shard_of(stem, self.count) == self.index


def shard_of(stem: str, count: int) -> int:
    """The shard (0-based, of `count`) of the slide whose output stem is `stem`: stable across processes and hosts."""
    digest = hashlib.sha256(stem.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def big_first(jobs: Sequence[SlideJob], sizes: Mapping[int, int]) -> list[SlideJob]:
    """`jobs` by size, biggest first (ties by stem), so shards finish together; `sizes` maps slide_id to bytes."""
    return sorted(jobs, key=lambda j: (-sizes.get(j.slide_id, 0), j.stem, j.slide_id))


@dataclass(frozen=True)
class ShardWork:
    """What one process works on: its own slides, then (with stealing) the others, in the order to steal them."""

    shard: Shard | None
    own: list[SlideJob]
    others: list[SlideJob] = field(default_factory=list)


def split_shard(jobs: Sequence[SlideJob], shard: Shard | None, sizes: Mapping[int, int]) -> ShardWork:
    """Split `jobs` into this shard's slides (biggest first) and the other shards' (`steal_order`).

    Without a shard every slide is this process's own, biggest first.
    """
    if shard is None:
        return ShardWork(None, big_first(jobs, sizes))
    own = [j for j in jobs if shard.owns(j.stem)]
    return ShardWork(shard, big_first(own, sizes), steal_order(jobs, shard, sizes))


def steal_order(jobs: Sequence[SlideJob], shard: Shard, sizes: Mapping[int, int]) -> list[SlideJob]:
    """The other shards' slides in the order a thief of `shard` tries them.

    Each owner works through its slides biggest first, so a thief starts at the other end (smallest first) and the
    two meet in the middle. Victims are visited round robin starting with the next shard (I+1, I+2, ...), so thieves
    of different shards start on different victims.
    """
    queues: list[list[SlideJob]] = []
    for offset in range(1, shard.count):
        victim = (shard.index + offset) % shard.count
        theirs = [j for j in jobs if shard_of(j.stem, shard.count) == victim]
        queues.append(list(reversed(big_first(theirs, sizes))))
    order: list[SlideJob] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        order += [q[rank] for q in queues if rank < len(q)]
    return order
