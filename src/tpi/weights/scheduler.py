"""The sliding-window memory scheduler: one device's layer blocks under a memory budget.

A device's slice is 2 x num_layers blocks plus its vocabulary slice of the output head,
used in the fixed order (0, attn), (0, mlp), (1, attn), ..., (L, head) and again from layer 0
for the next token. A block bigger than the store's cap is stored as pieces
(tpi.weights.slicing); the scheduler works on pieces (the window counts pieces), so "block"
below means one piece.

Retention. Given a budget (bytes the scheduler may hold), `plan_retention` keeps as many
blocks resident for good as fit beside the streaming window, spread evenly through the
order so that each streamed block's read overlaps the compute of resident ones. If the
whole slice fits, everything is resident and nothing is read after start-up. If not even
the window fits, planning fails with a MemoryBudgetError that says what would fit.

Streaming. A background loader thread reads the streamed blocks in execution order into
`window` preallocated buffers (W = 2: the block in use and the one being read), wrapping
to layer 0 for the next token. A block is read straight into its buffer (chunked preadv,
each chunk dropped from the page cache with POSIX_FADV_DONTNEED so the cache does not grow
inside the device's memory limit) and its tensors are views of that buffer: no second
copy. `release` hands the buffer back to the loader for the next block. The scheduler's
own bytes (resident blocks + window buffers + any dtype conversions) are counted, and the
high-water mark is kept in `stats.high_water_bytes`; it never exceeds the budget.

Integrity policy. Every file is checked against the manifest's sha256 on its first read,
and its (st_ino, st_size, st_mtime_ns, st_ctime_ns) remembered. Later reads compare the
fstat of the opened file with that signature: unchanged -> no hash (steady-state streaming
does not pay sha256 every token); changed (replaced, rewritten, touched) -> the full sha256
again. The size is checked on every read. So a block deleted or altered mid-run raises a
StoreError naming the file, from `get()` in the engine's thread; the loader never hangs the
engine. (ctime cannot be set from user space, so an in-place edit is always noticed on the
next read; an edit racing with a read may be used once before it is noticed.) After an
error the next request for a block restarts the loader, so a repaired store recovers.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.weights.quant import QUANTIZED_KINDS, pack_block, packed_copy_bytes
from tpi.weights.store import ShardStore, StoreError, aligned_bytes, aligned_empty, read_into, tensors_from_buffer
from tpi.model.blocks import Block, BlockSource

Key = tuple[int, str, int]  # (layer, "attn" | "mlp" | "head", piece)
MiB = 1 << 20


class MemoryBudgetError(ValueError):
    """The memory budget cannot hold what the scheduler needs."""


# --- sizes and budgets -----------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """'800MB' -> 800_000_000, '1.5GiB' -> 1_610_612_736, '4096' -> 4096 bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read the size {text!r}: use e.g. 800MB, 1.5GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int | None) -> str:
    if n is None:
        return "unlimited"
    if abs(n) >= 100 * MiB:
        return f"{n / MiB:.0f} MiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def default_device_budget(devices_in_process: int = 1, limit: int | None = None,
                          rss: int | None = None) -> int | None:
    """Memory one device may give to layer weights and its KV cache under the process's
    memory limit (tpi.host.memory_budget: the limit minus what the process holds and a
    headroom), shared by the devices of this process. None when there is no limit."""
    from tpi.host import headroom_bytes, memory_budget, memory_limit_bytes, rss_bytes

    limit = memory_limit_bytes() if limit is None else limit
    if limit is None:
        return None
    rss = (rss_bytes() or 0) if rss is None else rss
    free = memory_budget(limit, rss)
    if free <= 0:
        raise MemoryBudgetError(
            f"the memory limit {format_size(limit)} leaves nothing for layer weights: the process "
            f"already holds {format_size(rss)} and needs {format_size(headroom_bytes(limit))} of headroom")
    return free // devices_in_process


# --- the retention plan ----------------------------------------------------------------

def block_costs(store: ShardStore, rank: int, compute_dtype: torch.dtype) -> list[int]:
    """Bytes each block of the device's slice holds when loaded, in execution order: its read
    buffer (the file rounded up to whole pages, see `aligned_empty`) plus any dtype
    conversions. The budget is planned and accounted by this one rule."""
    return [aligned_bytes(store.files[rel].bytes) + packed_copy_bytes(store.files[rel].tensors, compute_dtype)
            for rel in store.block_files(rank)]


@dataclass(frozen=True)
class RetentionPlan:
    resident: tuple[int, ...]     # indices (in execution order) of blocks kept for good
    streamed: tuple[int, ...]     # indices of blocks read every token, in execution order
    slots: int                    # window buffers actually allocated: min(window, streamed)
    slot_cost: int                # bytes per window slot (largest streamed block, + conversions)
    planned_bytes: int            # resident costs + slots * slot_cost (<= budget)


def plan_retention(costs: list[int], window: int, budget: int | None) -> RetentionPlan:
    """Choose the resident blocks. costs[i]: bytes block i holds when loaded (execution order).

    Everything is resident when it fits (or there is no budget). Otherwise the plan streams
    as few bytes per token as the budget allows: the window takes min(window, streamed) slots
    the size of the largest streamed block, so keeping the biggest blocks resident can shrink
    every slot. Each candidate slot size is tried (blocks above it must be resident); for each,
    the rest of the budget holds blocks picked evenly through the order (by bytes), then
    topped up; the candidate streaming the fewest bytes wins."""
    n = len(costs)
    if window < 1:
        raise MemoryBudgetError(f"the window must hold at least one block, got {window}")
    total = sum(costs)
    if budget is None or total <= budget:
        return RetentionPlan(tuple(range(n)), (), 0, 0, total)
    plans = [p for p in (_plan_for_slot(costs, window, budget, s) for s in sorted(set(costs))) if p]
    if not plans:
        largest = max(costs)
        need = min(window * s + sum(c for c in costs if c > s) for s in set(costs))
        fits = budget // largest
        raise MemoryBudgetError(
            f"memory budget {format_size(budget)} cannot hold a window of {window} blocks of up to "
            f"{format_size(largest)}; " + (f"use --window {fits} or " if fits else "")
            + f"give a budget of at least {format_size(need)}")
    plan = min(plans, key=lambda p: (sum(costs[i] for i in p.streamed), p.planned_bytes))
    assert plan.planned_bytes <= budget, (plan, budget)
    return plan


def _plan_for_slot(costs: list[int], window: int, budget: int, slot: int) -> RetentionPlan | None:
    """The plan whose streamed blocks all cost at most `slot`; None if that cannot fit."""
    n = len(costs)
    resident = {i for i in range(n) if costs[i] > slot}
    used = sum(costs[i] for i in resident)
    avail = budget - window * slot - used
    if avail < 0:
        return None
    # Evenly by bytes: block i becomes resident when the bytes "owed" so far cover it.
    candidates = [i for i in range(n) if i not in resident]
    frac, owed = avail / sum(costs[i] for i in candidates), 0.0
    for i in candidates:
        owed += frac * costs[i]
        if owed >= costs[i] and used + costs[i] <= budget - window * slot:
            resident.add(i)
            owed -= costs[i]
            used += costs[i]
    while True:  # top up: a smaller or shorter window can free room for more residents
        streamed = [i for i in range(n) if i not in resident]
        slots = min(window, len(streamed))
        slot_cost = max(costs[i] for i in streamed)
        room = budget - slots * slot_cost - used
        extra = next((i for i in streamed if costs[i] <= room and len(streamed) > 1), None)
        if extra is None:
            break
        resident.add(extra)
        used += costs[extra]
    return RetentionPlan(tuple(sorted(resident)), tuple(streamed), slots, slot_cost, used + slots * slot_cost)


# --- integrity -------------------------------------------------------------------------

class FileVerifier:
    """sha256 on a file's first read and whenever its stat changes (see the module doc)."""

    def __init__(self, store: ShardStore):
        self.store = store
        self.signatures: dict[str, tuple[int, int, int, int]] = {}
        self.hashed = 0  # number of full sha256 checks made

    def check(self, rel: str, path: Path, st: os.stat_result, data: memoryview) -> None:
        entry = self.store.files[rel]
        if st.st_size != entry.bytes:
            self.signatures.pop(rel, None)
            raise StoreError(f"block file {path} has {st.st_size} bytes, manifest says {entry.bytes} "
                             f"(truncated or altered)")
        sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self.signatures.get(rel) == sig:
            return
        self.signatures.pop(rel, None)
        self.hashed += 1
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StoreError(f"block file {path} failed its sha256 check (altered or corrupt)")
        self.signatures[rel] = sig


# --- the block source ------------------------------------------------------------------

@dataclass
class SchedulerStats:
    budget_bytes: int | None = None
    held_bytes: int = 0           # bytes the scheduler holds now
    high_water_bytes: int = 0     # the most it ever held
    bytes_read: int = 0           # from disk, resident loads included
    files_read: int = 0
    sha256_checks: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Slot:
    buffer: torch.Tensor          # (slot bytes,) uint8
    copied: int = 0               # bytes of dtype conversions made for the block in it


@dataclass
class _Pending:
    block: Block
    slot: _Slot


def _tensors_of(block: Block):
    for v in block.values():
        if isinstance(v, QUANTIZED_KINDS):
            yield from v.tensors()
        else:
            yield v


class SlidingWindowBlocks(BlockSource):
    """Blocks of one device's slice: resident under the budget, the rest streamed."""

    def __init__(self, store: ShardStore, rank: int, *, window: int = 2, budget_bytes: int | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        self.store, self.rank, self.window, self.dtype = store, rank, window, compute_dtype
        if str(rank) not in store.manifest.get("pieces", {}):
            raise StoreError(f"{store.root}: manifest has no device {rank} (device {rank} not in this store?)")
        self.order: list[Key] = store.execution_order(rank)
        self.rels = [store.piece_path(rank, *key) for key in self.order]
        self._pieces = {kind: len(ranges) for kind, ranges in store.pieces(rank).items()}
        missing = [r for r in self.rels if r not in store.files]
        if missing:
            raise StoreError(f"{store.root}: manifest lists no {missing[0]} (device {rank} not in this store?)")
        file_bytes = [store.files[r].bytes for r in self.rels]
        self.plan = plan_retention(block_costs(store, rank, compute_dtype), window, budget_bytes)
        self.stats = SchedulerStats(budget_bytes=budget_bytes)
        self.verifier = FileVerifier(store)
        self._lock = threading.Lock()  # guards stats
        self.resident: dict[Key, Block] = {}
        for i in self.plan.resident:
            self.resident[self.order[i]] = self._load_resident(i)

        self.streamed: list[Key] = [self.order[i] for i in self.plan.streamed]
        self._pos = {key: p for p, key in enumerate(self.streamed)}
        slot_bytes = max((file_bytes[i] for i in self.plan.streamed), default=0)
        self.slots = [_Slot(aligned_empty(slot_bytes)) for _ in range(self.plan.slots)]
        self._free = list(self.slots)
        self._account(aligned_bytes(slot_bytes) * self.plan.slots)
        self._cond = threading.Condition()
        self._ready: dict[Key, _Pending] = {}
        self._in_use: Key | None = None
        self._next_load = 0           # position in self.streamed the loader reads next
        self._next_get = 0            # position the engine is expected to ask for next
        self._gen = 0                 # bumped on resync; loads of an older generation are dropped
        self._error: BaseException | None = None
        self._closed = False
        self._thread = None
        if self.streamed:
            self._thread = threading.Thread(target=self._loader, daemon=True, name=f"blocks-{rank}")
            self._thread.start()

    # accounting ---------------------------------------------------------------------

    def _account(self, delta: int) -> None:
        with self._lock:
            s = self.stats
            s.held_bytes += delta
            s.high_water_bytes = max(s.high_water_bytes, s.held_bytes)

    # reading ------------------------------------------------------------------------

    def _read(self, i: int, buf: torch.Tensor) -> tuple[Block, int, int]:
        """Read block i into buf; returns (block, file bytes, bytes of conversions)."""
        rel = self.rels[i]
        path = self.store.root / rel
        try:
            size, st = read_into(path, buf)
        except FileNotFoundError:
            raise StoreError(f"block file missing: {path}") from None
        except OSError as e:
            raise StoreError(f"cannot read block file {path}: {e}") from e
        data = memoryview(buf.numpy()).cast("B")[:size]
        hashed = self.verifier.hashed
        self.verifier.check(rel, path, st, data)
        try:
            tensors = tensors_from_buffer(buf, size, str(path))
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"block file {path} cannot be parsed: {e}") from e
        block, copied = pack_block(tensors, self.dtype)
        with self._lock:
            self.stats.bytes_read += size
            self.stats.files_read += 1
            self.stats.sha256_checks += self.verifier.hashed - hashed
        return block, size, copied

    def _load_resident(self, i: int) -> Block:
        held = aligned_bytes(self.store.files[self.rels[i]].bytes)
        buf = aligned_empty(self.store.files[self.rels[i]].bytes)
        self._account(held)
        block, size, copied = self._read(i, buf)
        ptr = buf.untyped_storage().data_ptr()
        if not any(t.untyped_storage().data_ptr() == ptr for t in _tensors_of(block)):
            self._account(-held)  # every tensor was converted: the buffer goes
        self._account(copied)
        return block

    def _loader(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._error is not None or not self._free):
                    self._cond.wait()
                if self._closed:
                    return
                gen, pos = self._gen, self._next_load
                self._next_load = (pos + 1) % len(self.streamed)
                slot = self._free.pop()
            key = self.streamed[pos]
            try:
                block, _, copied = self._read(self.plan.streamed[pos], slot.buffer)
                error = None
            except BaseException as e:  # handed to the engine's thread by get()
                block, copied, error = None, 0, e
            self._account(copied)
            slot.copied = copied
            with self._cond:
                if gen != self._gen or self._closed:
                    self._free_slot(slot, block)
                elif error is not None:
                    self._error = error
                    self._free_slot(slot, block)
                else:
                    self._ready[key] = _Pending(block, slot)
                self._cond.notify_all()

    def _free_slot(self, slot: _Slot, block: Block | None) -> None:
        """Give a slot back (under the condition): conversions are dropped, the buffer kept."""
        if block is not None:
            block.clear()  # also empties the engine's reference to this dict
        self._account(-slot.copied)
        slot.copied = 0
        self._free.append(slot)

    def _resync(self, pos: int) -> None:
        """The engine asked out of order (a step failed midway, or a new caller): start over
        from `pos`, dropping what was prefetched."""
        self._gen += 1
        for pending in self._ready.values():
            self._free_slot(pending.slot, pending.block)
        self._ready.clear()
        self._in_use = None
        self._error = None
        self._next_load = self._next_get = pos
        self._cond.notify_all()

    # BlockSource ----------------------------------------------------------------------

    def pieces(self, kind: str) -> int:
        return self._pieces.get(kind, 0)

    def get(self, layer: int, kind: str, piece: int = 0) -> Block:
        key = (layer, kind, piece)
        block = self.resident.get(key)
        if block is not None:
            return block
        if key not in self._pos:
            raise KeyError(f"device {self.rank} has no block {key}")
        with self._cond:
            if self._closed:
                raise StoreError("the block source is closed")
            if self._in_use is not None:  # one streamed block in use at a time
                self._release_locked(self._in_use)
            pos = self._pos[key]
            if pos != self._next_get:
                self._resync(pos)
            while key not in self._ready:
                if self._error is not None:
                    self._next_get = -1  # the next request starts the loader afresh
                    raise self._error
                if self._closed:
                    raise StoreError("the block source was closed while waiting for a block")
                if not self._thread.is_alive():
                    raise StoreError(f"the block loader of device {self.rank} stopped")
                self._cond.wait(timeout=1.0)
            self._in_use = key
            self._next_get = (pos + 1) % len(self.streamed)
            return self._ready[key].block

    def release(self, layer: int, kind: str, piece: int = 0) -> None:
        key = (layer, kind, piece)
        if key in self.resident:
            return
        with self._cond:
            self._release_locked(key)

    def _release_locked(self, key: Key) -> None:
        pending = self._ready.pop(key, None)
        if self._in_use == key:
            self._in_use = None
        if pending is not None:
            self._free_slot(pending.slot, pending.block)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def describe(self) -> dict:
        """The plan and counters, for --json output and benchmarks."""
        return {
            "window": self.window, "slots": self.plan.slots,
            "resident_blocks": len(self.plan.resident), "streamed_blocks": len(self.plan.streamed),
            "planned_bytes": self.plan.planned_bytes, **self.stats.to_json(),
        }
