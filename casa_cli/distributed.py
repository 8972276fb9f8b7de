"""Data-parallel runs under torchrun. A command started as

    torchrun --nproc-per-node 4 -m casa_cli classify --manifest in.jsonl --output out.jsonl

runs once per rank: every rank reads the whole input, takes its share (`shard`), writes its
records to its own part file next to --output (`out.jsonl.rank2-of-4.part`), and after a
barrier rank 0 merges all parts into --output in input order and removes them.

--resume counts as done every id already in --output or in any part file left by a killed
run (whatever its number of ranks), and shares out only the rest. Started without torchrun,
a command is a world of one and streams straight to --output, as before.
"""
from __future__ import annotations

import glob
import os
from collections import defaultdict, deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from casa_cli.inputs import InputError, Sample
from casa_cli.output import RecordWriter, progress, read_records

# Ranks wait at the last barrier for the slowest shard; shards are balanced, but a slow model
# load or a node's stragglers can take longer than the default (10 min for NCCL) allows.
TIMEOUT = timedelta(hours=2)
# An image or audio clip expands into hundreds of tokens (576 for LLaVA-1.5): for balancing,
# each costs about as much as this many characters of prompt text.
MEDIA_COST = 2000


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (rank 0 of 1 when started without torchrun)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls) -> World:
        """Read the variables torchrun sets for each rank."""
        env = os.environ
        return cls(rank=int(env.get("RANK", 0)), size=int(env.get("WORLD_SIZE", 1)),
                   local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_size=int(env.get("LOCAL_WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, requested: str) -> str:
        """Each rank of a node on its own GPU: `auto` and `cuda` become cuda:LOCAL_RANK."""
        if self.distributed and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, counts: dict[str, int]) -> dict[str, int]:
        """`counts` added up over all ranks (every rank gets the totals)."""
        if not self.distributed:
            return counts
        every = [None] * self.size
        dist.all_gather_object(every, counts)
        return {key: sum(c[key] for c in every) for key in counts}

    def gather(self, items: list) -> list[list]:
        """Every rank's `items`, on rank 0 (other ranks get [])."""
        if not self.distributed:
            return [items]
        every = [None] * self.size if self.main else None
        dist.gather_object(items, every, dst=0)
        return every or []


@contextmanager
def launched(device: str = "auto", device_map: str | None = None) -> Iterator[World]:
    """This process's World, with the process group up for the block when under torchrun:
    NCCL where the rank runs on a GPU, else gloo."""
    world = World.from_env()
    if device_map and world.local_size > 1:
        raise InputError("--device-map spreads one model over all of a node's GPUs: "
                         "run one process per node (torchrun --nproc-per-node 1)")
    if not world.distributed or dist.is_initialized():
        yield world
        return
    import torch._dynamo  # noqa: F401  (see below)

    from casa_cli.backbone import resolve_device

    # torch._dynamo, when first imported after the process group exists (loading a model
    # does), keeps a reference to the group: destroy_process_group then leaves gloo's
    # threads running into interpreter shutdown, where they can abort a rank that has
    # finished its work (SIGABRT, "terminate called without an active exception").
    rank_device = resolve_device(world.device(device))
    if rank_device.type == "cuda":
        torch.cuda.set_device(rank_device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=rank_device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield world
    finally:
        dist.destroy_process_group()


# --- sharing out samples -------------------------------------------------------------------
def cost(sample: Sample) -> int:
    """A sample's rough compute, for balancing: its text length plus its media."""
    return len(sample.text) + MEDIA_COST * (len(sample.images) + len(sample.audio))


def shard(costs: Sequence[float], rank: int, size: int) -> list[int]:
    """The indices (ascending) of rank `rank`'s items out of `size` ranks. Items are dealt in
    order of decreasing cost, snaking (ranks 0..n-1, then n-1..0, ...) so that every rank gets
    a like mix of long and short prompts: counts differ by at most one, total costs by at most
    the largest single cost. Ties go by index, so the split depends only on the input."""
    by_cost = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    mine = []
    for turn, index in enumerate(by_cost):
        lap, seat = divmod(turn, size)
        if (seat if lap % 2 == 0 else size - 1 - seat) == rank:
            mine.append(index)
    return sorted(mine)


# --- part files and the merge --------------------------------------------------------------
def part_path(output: Path, rank: int, size: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}-of-{size}.part")


def part_files(output: Path) -> list[Path]:
    """Every part file of `output`, from runs with any number of ranks."""
    return sorted(output.parent.glob(f"{glob.escape(output.name)}.rank*-of-*.part"))


def record_id(record: dict):
    return record["id"]


def merge(order: Sequence, sources: Iterable[Iterable[dict]],
          key: Callable[[dict], Hashable] = record_id) -> list[dict]:
    """The records of `sources` in input order (`order`: the input's keys, in order; a
    record's key is `key(record)`, its id by default). A key the input holds twice takes its
    records in turn. A record beyond that (a copy from a merge killed before it removed the
    parts, or the error record of a failure a resumed run retried) is dropped: finished
    records are taken before error records. Records of keys not in the input (left in
    --output by an earlier run) are kept, after the others."""
    by_key: dict = defaultdict(list)
    for records in sources:
        for record in records:
            by_key[key(record)].append(record)
    # Finished records first; the sort is stable, so file order otherwise.
    queues = {k: deque(sorted(records, key=lambda r: "error" in r)) for k, records in by_key.items()}
    merged = [queues[k].popleft() for k in order if queues.get(k)]
    wanted = set(order)
    return merged + [r for k, queue in queues.items() if k not in wanted for r in queue]


def merge_parts(output: Path, order: Sequence, size: int,
                key: Callable[[dict], Hashable] = record_id) -> None:
    """--output (what a resumed run keeps) and all part files into --output, in input order;
    then the parts are removed. Written aside and renamed, so a kill midway loses nothing.
    Every rank of this run (`size` ranks) has opened its part file, so one that is missing
    means rank 0 cannot see the others' files: refuse rather than merge an incomplete set."""
    expected = [part_path(output, rank, size) for rank in range(size)]
    missing = [path for path in expected if not path.is_file()]
    if missing:
        raise RuntimeError(f"{missing[0]} is not visible to rank 0: under torchrun on several "
                           "machines, --output must be on a filesystem they all share")
    parts = part_files(output)
    merged = merge(order, (read_records(path) for path in [output, *parts]), key)
    staging = output.with_name(output.name + ".merging")
    with RecordWriter(staging) as writer:
        for record in merged:
            writer.write(record)
        os.replace(staging, output)  # still locked: the lock moves with the file
    for path in parts:
        path.unlink()


class Shard:
    """This rank's part of a job over `samples` (their count `total`, when known): `samples`
    to run, `path` to write records to (None without --output), and `finish` to merge.

    Each sample yields the records `keys(sample)` names (one, keyed by its id, by default;
    `casa eval` writes one per defence, keyed (defence, id) by `record_key`). With --resume,
    `already_done` holds the keys that have a finished record in --output or a part file: a
    sample is skipped when all of its keys are there (`casa eval` skips the pairs too).

    A world of one streams (samples stay lazy, records go straight to --output) unless
    --resume finds part files of a killed distributed run: then it takes the sharded path as
    a world of one, so they are merged. On the sharded path rank 0 holds --output (locked,
    emptied unless resuming) from the start to the merge, so a second job cannot write it
    meanwhile; use the Shard as a context manager, which lets go of it."""

    def __init__(self, world: World, samples: Iterable[Sample], total: int | None,
                 output: Path | None, resume: bool,
                 keys: Callable[[Sample], list] = lambda sample: [sample.id],
                 record_key: Callable[[dict], Hashable] = record_id):
        self.world, self.output, self.keys, self.record_key = world, output, keys, record_key
        self.claim = None
        self.streaming = not world.distributed and not (resume and output and part_files(output))
        if self.streaming:
            done = self.already_done = self.done([output]) if resume and output else set()
            self.samples, self.total = samples, total
            if done and isinstance(samples, list):
                self.samples = [s for s in samples if not self.finished(s, done)]
                self.total = len(self.samples)
            elif done:  # a lazy input stays lazy; the count is the best guess without reading it
                self.samples = (s for s in samples if not self.finished(s, done))
                self.total = None if total is None else max(total - len(done), 0)
            self.path = output
            return
        everything = list(samples)
        self.order = [k for s in everything for k in keys(s)]
        if output is not None and world.main:
            self.claim = RecordWriter(output, resume=resume)
            if not resume:  # the output starts empty, as in a single process
                for stale in part_files(output):
                    stale.unlink(missing_ok=True)
        done = self.already_done = (self.done([output, *part_files(output)])
                                    if resume and output is not None else set())
        world.barrier()  # every rank has read what is done before any rank writes
        todo = [s for s in everything if not self.finished(s, done)]
        self.samples = [todo[i] for i in shard([cost(s) for s in todo], world.rank, world.size)]
        self.total = len(self.samples)
        self.path = None if output is None else part_path(output, world.rank, world.size)

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, *exc) -> None:
        if self.claim is not None:
            self.claim.close()

    def done(self, paths: list[Path]) -> set:
        """The keys with a finished record in any of `paths` (error records are retried)."""
        return {self.record_key(r) for path in paths for r in read_records(path) if "error" not in r}

    def finished(self, sample: Sample, done: set) -> bool:
        return all(k in done for k in self.keys(sample))

    def progress(self, description: str, per_sample: int = 1, records_on_stdout: bool = False):
        """A progress bar on rank 0 only (of its own shard, `per_sample` steps per sample);
        yields advance(n). See `output.progress_tasks` for `records_on_stdout`."""
        if not self.world.main:
            return nullcontext(lambda n=1: None)
        if self.world.distributed:
            description += f" (rank 0 of {self.world.size})"
        return progress(None if self.total is None else self.total * per_sample, description,
                        records_on_stdout)

    def finish(self, kept: list[dict]) -> list[dict]:
        """Call on every rank once its records are written. Rank 0 merges the part files into
        --output, or, without --output, gets every rank's `kept` records back in input order
        (the other ranks get []). A streaming run gets its own `kept` back."""
        if self.streaming:
            return kept
        if self.output is None:
            every = self.world.gather(kept)
            return merge(self.order, every, self.record_key) if self.world.main else []
        self.world.barrier()  # every part file is complete
        if self.world.main:
            merge_parts(self.output, self.order, self.world.size, self.record_key)
        return []
