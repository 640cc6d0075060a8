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

KV growth. The KV cache takes a slot's memory when a sequence first uses the slot
(tpi.model.kvcache); past the slots the budget was planned with, `shrink` gives the room
up: `retention.demote` turns resident blocks into streamed ones (never loading any), the
loader restarts on the new order, and the device streams more from then on. So a device
serving one request keeps the weights resident that the other slots' KV would later take.

Experts. A mixture-of-experts layer's experts are blocks of their own that a token uses only
if the router chose them, so they are not in the streamed order: `plan_with_experts` keeps
the dense blocks' plan first (they are read every token) and gives what it leaves to
resident experts; the others are read on demand, when the MLP step asks for a chosen one,
into one slot of their own (the choice is known only then: nothing to prefetch). Cold
experts are never read.

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
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.host import release_freed_memory
from tpi.weights.packing import pack_block
from tpi.weights.quant import QUANTIZED_KINDS
from tpi.weights.retention import block_costs, demote, plan_with_experts
from tpi.weights.store import ShardStore, StoreError, aligned_bytes, aligned_empty, read_into, tensors_from_buffer
from tpi.model.blocks import Block, BlockSource

Key = tuple[int, str, int]  # (layer, "attn" | "mlp" | "expert" | "dense" | "head", piece)


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
                 compute_dtype: torch.dtype = torch.bfloat16, gguf_exact: bool = False):
        self.store, self.rank, self.window, self.dtype = store, rank, window, compute_dtype
        self.gguf_exact = gguf_exact    # RuntimeOptions.gguf_exact
        if str(rank) not in store.manifest.get("pieces", {}):
            raise StoreError(f"{store.root}: manifest has no device {rank} (device {rank} not in this store?)")
        self.order: list[Key] = store.execution_order(rank)
        self.rels = [store.piece_path(rank, *key) for key in self.order]
        self._pieces = {kind: len(ranges) for kind, ranges in store.pieces(rank).items()}
        missing = [r for r in self.rels if r not in store.files]
        if missing:
            raise StoreError(f"{store.root}: manifest lists no {missing[0]} (device {rank} not in this store?)")
        self.file_bytes = [store.files[r].bytes for r in self.rels]
        self.costs = block_costs(store, rank, compute_dtype, gguf_exact)
        self.is_expert = [kind == "expert" for _, kind, _ in self.order]
        self.plan = plan_with_experts(self.costs, self.is_expert, window, budget_bytes)
        self.stats = SchedulerStats(budget_bytes=budget_bytes)
        self.verifier = FileVerifier(store)
        self._lock = threading.Lock()  # guards stats
        self.resident: dict[Key, Block] = {}
        self._resident_bytes: dict[Key, int] = {}   # what each resident block is accounted at
        for i in self.plan.resident:
            self.resident[self.order[i]] = self._load_resident(i)

        self._demand = {self.order[i]: i for i in self.plan.on_demand}   # expert key -> index
        demand_bytes = max((self.file_bytes[i] for i in self.plan.on_demand), default=0)
        self._demand_slot = _Slot(aligned_empty(demand_bytes))
        self._demand_block: tuple[Key, Block] | None = None
        self._account(aligned_bytes(demand_bytes) if self.plan.on_demand else 0)
        self._cond = threading.Condition()
        self._gen = 0                 # bumped on resync; loads of an older generation are dropped
        self._closed = False
        self._thread = None
        self._start_streaming()

    def _start_streaming(self) -> None:
        """The window's slots and the loader thread for the plan's streamed blocks."""
        self.streamed: list[Key] = [self.order[i] for i in self.plan.streamed]
        self._pos = {key: p for p, key in enumerate(self.streamed)}
        self._slot_bytes = max((self.file_bytes[i] for i in self.plan.streamed), default=0)
        self.slots = [_Slot(aligned_empty(self._slot_bytes)) for _ in range(self.plan.slots)]
        self._free = list(self.slots)
        self._account(aligned_bytes(self._slot_bytes) * self.plan.slots)
        self._ready: dict[Key, _Pending] = {}
        self._in_use: Key | None = None
        self._next_load = 0           # position in self.streamed the loader reads next
        self._next_get = 0            # position the engine is expected to ask for next
        self._error: BaseException | None = None
        self._thread = None
        if self.streamed:
            self._thread = threading.Thread(target=self._loader, daemon=True, name=f"blocks-{self.rank}")
            self._thread.start()

    def _stop_streaming(self) -> None:
        """Stop the loader and give back the window's slots (what they hold is dropped)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            for pending in self._ready.values():
                self._free_slot(pending.slot, pending.block)
            self._ready.clear()
            self._closed = False
        self._account(-aligned_bytes(self._slot_bytes) * len(self.slots))
        self.slots, self._free = [], []

    def shrink(self, nbytes: int) -> None:
        """Hold `nbytes` less from now on (the KV cache grew): resident blocks become streamed
        (`retention.demote`: nothing is loaded, so the device never holds more meanwhile).
        Called between steps, from the engine's thread."""
        if self.stats.budget_bytes is None:
            return
        budget = self.stats.budget_bytes - nbytes
        plan = demote(self.costs, self.is_expert, self.plan, self.window, budget)
        self._stop_streaming()
        for i in set(self.plan.resident) - set(plan.resident):
            key = self.order[i]
            self.resident.pop(key).clear()
            self._account(-self._resident_bytes.pop(key))
        self.plan = plan
        self.stats.budget_bytes = budget
        release_freed_memory()
        self._start_streaming()

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
        block, copied = pack_block(tensors, self.dtype, self.gguf_exact)
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
            held = 0
        self._account(copied)
        self._resident_bytes[self.order[i]] = held + copied
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
        if key in self._demand:
            return self._get_on_demand(key)
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

    def _get_on_demand(self, key: Key) -> Block:
        """A chosen expert that is not resident, read now into the experts' slot (in the
        engine's thread: errors are raised here)."""
        self._drop_demand()
        block, _, copied = self._read(self._demand[key], self._demand_slot.buffer)
        self._account(copied)
        self._demand_slot.copied = copied
        self._demand_block = (key, block)
        return block

    def _drop_demand(self) -> None:
        if self._demand_block is not None:
            self._demand_block[1].clear()
            self._account(-self._demand_slot.copied)
            self._demand_slot.copied = 0
            self._demand_block = None

    def release(self, layer: int, kind: str, piece: int = 0) -> None:
        key = (layer, kind, piece)
        if key in self.resident:
            return
        if key in self._demand:
            if self._demand_block is not None and self._demand_block[0] == key:
                self._drop_demand()
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
            "on_demand_blocks": len(self.plan.on_demand),
            "planned_bytes": self.plan.planned_bytes, **self.stats.to_json(),
        }
