"""The request scheduler: one thread owns the cluster and decodes every active request together.

Requests wait in arrival order until a KV-cache slot is free. A new request is prefilled
alone (B=1, its whole prompt), then joins the batch: each decode step is ONE
`cluster.forward` over all active sequences (B rows, T=1, each row in its own slot at its
own position), so every weight block read from disk serves all of them. Rows never mix:
each has its own cache slot, positions, sampling parameters and random generator, so a
greedy request yields the same tokens alone or batched (up to floating-point rounding of
the batched kernels; see docs/api.md).

Consumers (HTTP threads) read a sequence's `events` queue: `Token`, then one `Finished` or
`Failed`. `Sequence.cancel()` may be called from any thread; the sequence leaves the batch
before the next step.

When `cluster.forward` raises `CommError`, the scheduler calls `on_cluster_failure()`. If it
returns True (the cluster was rebuilt), every active sequence is prefilled again with its
prompt plus the tokens it already produced, and decoding resumes: clients only see a
pause. Otherwise the active sequences fail with a 503 error and the scheduler serves the
queue as usual.
"""
from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from tpi.comm.base import CommError
from tpi.model.sampling import SamplingParams, choose_token
from tpi_master.errors import APIError, cluster_unavailable, internal_error
from tpi_master.metrics import MasterMetrics

log = logging.getLogger("tpi.master.scheduler")


@dataclass(frozen=True)
class Token:
    token: int


@dataclass(frozen=True)
class Finished:
    reason: str                     # "stop" | "length" | "cancelled"


@dataclass(frozen=True)
class Failed:
    error: APIError


class QueueFull(Exception):
    pass


class Sequence:
    """One request as the scheduler sees it."""

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: set[int], max_seq: int):
        self.id = secrets.token_hex(8)
        self.prompt, self.params, self.stop_ids = list(prompt), params, stop_ids
        self.budget = min(params.max_new_tokens, max_seq - len(prompt))
        self.rng = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.tokens: list[int] = []
        self.events: queue.Queue = queue.Queue()
        self.slot: int | None = None
        self.pos = 0                        # tokens held in this sequence's cache slot
        self.arrived = time.monotonic()
        self.started: float | None = None   # prefill began
        self.first_token: float | None = None
        self.ended: float | None = None
        self.finish_reason: str | None = None
        self.cancel_reason: str | None = None
        # one entry per forward this sequence took part in: (wall_s, batch, prefill, per device [c, m, d])
        self.steps: list[tuple[float, int, bool, list[list[float]]]] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the scheduler to end this sequence (client gone: "cancelled"; stop string: "stop")."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def summary(self, per_token: bool = False) -> dict:
        end = self.ended or time.monotonic()
        decode = [s[0] for s in self.steps if not s[2]]
        out = {
            "id": self.id,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt),
            "completion_tokens": len(self.tokens),
            "queue_wait_s": (self.started or end) - self.arrived,
            "ttft_s": None if self.first_token is None else self.first_token - self.arrived,
            "duration_s": end - self.arrived,
            "decode_tokens_per_s": len(decode) / sum(decode) if decode and sum(decode) > 0 else None,
        }
        if per_token:
            # per forward of this sequence: its wall time, the batch size it shared, and per
            # device [compute_s, comm_s, disk_wait_s]; entry 0 is the prefill
            out["per_token"] = [{"wall_s": w, "batch": b, "prefill": p, "devices": d}
                                for w, b, p, d in self.steps]
        return out


class Scheduler:
    def __init__(self, engine, num_slots: int, *, metrics: MasterMetrics | None = None,
                 on_cluster_failure: Callable[[], bool] | None = None, max_queue: int = 256,
                 max_recoveries: int = 3, history: int = 16,
                 between_requests: Callable[[], None] | None = None):
        self.engine = engine
        self.num_slots = num_slots
        self.metrics = metrics or MasterMetrics(lambda: len(self.waiting), lambda: len(self.active),
                                                lambda: self.num_slots)
        self.on_cluster_failure = on_cluster_failure
        self.between_requests = between_requests  # membership changes, applied while idle
        self.max_queue, self.max_recoveries = max_queue, max_recoveries
        self.cond = threading.Condition()
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.free_slots = list(range(num_slots))
        self.recent: deque[dict] = deque(maxlen=history)
        self.last: Sequence | None = None       # the last finished sequence (its per-token timings)
        self._closing = False
        self._hook_due = False                  # run between_requests even with no request (see poke)
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    # ---- called from request threads ----

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def close(self) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, prompt: list[int], params: SamplingParams, ignore_eos: bool = False) -> Sequence:
        gen = self.engine.generator
        gen.check_fits(len(prompt), params.max_new_tokens)
        stops = set() if ignore_eos else gen.stop_ids | set(params.stop_token_ids)
        seq = Sequence(prompt, params, stops, gen.max_seq)
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(seq)
            self.cond.notify_all()
        return seq

    def position(self, seq: Sequence) -> int:
        """0 when the sequence runs (or will as soon as the scheduler looks), else its place in
        the line of requests waiting for a slot (1 = next)."""
        with self.cond:
            try:
                idx = self.waiting.index(seq)
            except ValueError:
                return 0
            return max(0, idx + 1 - len(self.free_slots))

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def poke(self) -> None:
        """Run `between_requests` as soon as no request is active, even if none arrives (a
        worker registered while the master is idle is admitted at once). Any thread."""
        with self.cond:
            self._hook_due = True
            self.cond.notify_all()

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self.cond:
            free = len(self.free_slots)
            waiting = [{"id": s.id, "position": max(0, i + 1 - free), "waited_s": now - s.arrived,
                        "prompt_tokens": len(s.prompt)} for i, s in enumerate(self.waiting)]
            active = [{"id": s.id, "slot": s.slot, "position": s.pos, "prompt_tokens": len(s.prompt),
                       "completion_tokens": len(s.tokens), "max_tokens": s.budget} for s in self.active]
            last = self.last.summary(per_token=True) if self.last else None
            recent = list(self.recent)
        return {"slots": self.num_slots, "queue_depth": len(waiting), "waiting": waiting,
                "active": active, "last_request": last, "recent": recent}

    # ---- the scheduler thread ----

    def _run(self) -> None:
        while True:
            with self.cond:
                self._drop_cancelled()
                while not self._closing and not self.active and not self.waiting and not self._hook_due:
                    self.cond.wait()
                    self._drop_cancelled()
                if self._closing:
                    self._fail_all(APIError(503, "the server is shutting down", type="server_error",
                                            code="shutting_down"), include_waiting=True)
                    return
                idle = not self.active
                if idle:
                    self._hook_due = False
            if idle and self.between_requests is not None:
                try:  # outside the lock: a re-plan may take seconds; requests keep queueing
                    self.between_requests()
                except Exception:  # noqa: BLE001 - serve with the cluster we have
                    log.exception("between-requests hook failed")
            with self.cond:
                while self.waiting and self.free_slots:
                    seq = self.waiting.popleft()
                    seq.slot, seq.started = self.free_slots.pop(0), time.monotonic()
                    self.active.append(seq)
                    self.metrics.queue_wait.observe(seq.started - seq.arrived)
            try:
                for seq in [s for s in self.active if s.pos == 0]:
                    self._prefill(seq)
                    self.metrics.prompt_tokens.inc(len(seq.prompt))
                decoding = [s for s in self.active if s.pos > 0 and s.cancel_reason is None]
                if decoding:
                    self._decode(decoding)
            except CommError as e:
                self._recover(e)
            except Exception as e:  # a bug or a broken device: fail these requests, keep serving
                log.exception("generation step failed")
                with self.cond:
                    self._fail_all(internal_error(f"{type(e).__name__}: {e}"))

    def _forward(self, seqs: list[Sequence], ids: torch.Tensor, starts: list[int], prefill: bool) -> torch.Tensor:
        """ids (B, T) -> float32 logits (B, vocab) of each row's last position."""
        t0 = time.perf_counter()
        engine = self.engine
        candidates = engine.cluster.forward(engine.embedder.embed(ids), [s.slot for s in seqs], starts)
        logits = candidates.logits()                                                           # (B, vocab)
        wall = time.perf_counter() - t0
        devices = [[b.compute_s, b.comm_s, b.disk_wait_s] for b in engine.cluster.breakdowns()]
        for s in seqs:
            s.steps.append((wall, len(seqs), prefill, devices))
        if not prefill:
            self.metrics.decode_steps.inc()
            self.metrics.decode_rows.inc(len(seqs))
            self.metrics.step_latency.observe(wall)
        return logits

    def _prefill(self, seq: Sequence) -> None:
        """Run the prompt (and any tokens already produced, after a recovery) through an empty slot."""
        ids = seq.prompt + seq.tokens
        logits = self._forward([seq], torch.tensor([ids]), [0], prefill=True)    # (1, vocab)
        seq.pos = len(ids)
        self._accept(seq, logits[0])

    def _decode(self, seqs: list[Sequence]) -> None:
        ids = torch.tensor([[s.tokens[-1]] for s in seqs])                      # (B, 1)
        logits = self._forward(seqs, ids, [s.pos for s in seqs], prefill=False)  # (B, vocab)
        for b, seq in enumerate(seqs):
            seq.pos += 1
            self._accept(seq, logits[b])

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> None:
        try:
            token = choose_token(logits, seq.params, seq.rng)
        except Exception as e:  # e.g. probabilities that are not finite: only this request fails
            with self.cond:
                self._finish(seq, None, internal_error(f"sampling failed: {e}"))
            return
        if token in seq.stop_ids:
            with self.cond:
                self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        if seq.first_token is None:
            seq.first_token = time.monotonic()
            self.metrics.ttft.observe(seq.first_token - seq.arrived)
        self.metrics.generated_tokens.inc()
        seq.events.put(Token(token))
        if len(seq.tokens) >= seq.budget:
            with self.cond:
                self._finish(seq, "length")

    def _recover(self, error: CommError) -> None:
        """The cluster lost a device mid-step. Rebuild (if the master can) and re-prefill."""
        log.warning("cluster forward failed: %s", error)
        self.metrics.cluster_failures.inc()
        for attempt in range(self.max_recoveries):
            try:
                rebuilt = bool(self.on_cluster_failure and self.on_cluster_failure())
            except Exception:
                log.exception("on_cluster_failure raised")
                rebuilt = False
            if not rebuilt:
                break
            self.metrics.cluster_recoveries.inc()
            log.info("cluster rebuilt; prefilling %d active sequences again", len(self.active))
            try:
                for seq in list(self.active):
                    if not seq.done:
                        self._prefill(seq)
                return
            except CommError as e:
                error = e
                self.metrics.cluster_failures.inc()
                log.warning("cluster failed again while recovering (attempt %d): %s", attempt + 1, e)
        with self.cond:
            self._fail_all(cluster_unavailable(str(error)))

    # ---- bookkeeping (caller holds self.cond) ----

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.cancel_reason]:
            self.waiting.remove(seq)
            self._finish(seq, seq.cancel_reason)
        for seq in [s for s in self.active if s.cancel_reason]:
            self._finish(seq, seq.cancel_reason)

    def _fail_all(self, error: APIError, include_waiting: bool = False) -> None:
        for seq in list(self.active):
            self._finish(seq, None, error)
        if include_waiting:
            while self.waiting:
                self._finish(self.waiting.popleft(), None, error)

    def _finish(self, seq: Sequence, reason: str | None, error: APIError | None = None) -> None:
        if seq.done:
            return
        seq.ended = time.monotonic()
        seq.finish_reason = reason or "error"
        if seq in self.active:
            self.active.remove(seq)
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            self.free_slots.sort()
        self.metrics.finished.inc(1, seq.finish_reason)
        self.metrics.request_latency.observe(seq.ended - seq.arrived)
        self.recent.appendleft(seq.summary())
        if seq.started is not None:
            self.last = seq
        seq.events.put(Failed(error) if error else Finished(seq.finish_reason))
        self.cond.notify_all()
