"""The request scheduler: one thread owns the cluster and drives the engine's generator
(tpi.generation) over every active request together.

Requests wait in arrival order until a KV-cache slot is free. A new request is prefilled
alone (B=1, its whole prompt), then joins the batch: each decode step is ONE
`Generator.decode` over all active sequences (one cluster forward, B rows, each in its own
slot at its own position), so every weight block read from disk serves all of them. Token
choice, stop rules and the token budget are the generator's; this module keeps the
threads, the queue, cancellation, recovery and metrics.

Consumers (HTTP threads) read a request's `events` queue: `Token`, then one `Finished` or
`Failed`. `Request.cancel()` may be called from any thread; the request leaves the batch
before the next step.

When a forward raises `CommError`, the scheduler calls `on_cluster_failure()`. If it
returns True (the cluster was rebuilt), every active sequence is prefilled again with its
prompt plus the tokens it already produced, and decoding resumes: clients only see a
pause. Otherwise the active requests fail with a 503 error and the scheduler serves the
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

from tpi.comm.base import CommError
from tpi.generation import Sequence, Step
from tpi.generation.logprobs import TokenLogprob, from_logits
from tpi.model.sampling import SamplingParams
from tpi_master.errors import APIError, cluster_unavailable, internal_error
from tpi_master.metrics import MasterMetrics

log = logging.getLogger("tpi.master.scheduler")


@dataclass(frozen=True)
class Token:
    token: int
    logprob: TokenLogprob | None = None     # when the request asked for log probabilities


@dataclass(frozen=True)
class Finished:
    reason: str                     # "stop" | "length" | "cancelled"


@dataclass(frozen=True)
class Failed:
    error: APIError


class QueueFull(Exception):
    pass


class Request:
    """One request as the scheduler sees it: the generator's sequence, plus its events,
    timings and cancellation."""

    def __init__(self, seq: Sequence, logprobs: int | None = None):
        self.id = secrets.token_hex(8)
        self.seq = seq
        self.logprobs = logprobs            # alternatives reported per token (None: no log probabilities)
        self.events: queue.Queue = queue.Queue()
        self.arrived = time.monotonic()
        self.started: float | None = None   # prefill began
        self.first_token: float | None = None
        self.ended: float | None = None
        self.finish_reason: str | None = None
        self.cancel_reason: str | None = None
        # one entry per forward this request took part in:
        # (wall_s, batch, prefill, per device [c, m, d], tokens it gained)
        self.steps: list[tuple[float, int, bool, list[list[float]], int]] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the scheduler to end this request (client gone: "cancelled"; stop string: "stop")."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def summary(self, per_token: bool = False) -> dict:
        end = self.ended or time.monotonic()
        decode = [s for s in self.steps if not s[2]]
        decode_s, decoded = sum(s[0] for s in decode), sum(s[4] for s in decode)
        out = {
            "id": self.id,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.seq.prompt),
            "completion_tokens": len(self.seq.tokens),
            "queue_wait_s": (self.started or end) - self.arrived,
            "ttft_s": None if self.first_token is None else self.first_token - self.arrived,
            "duration_s": end - self.arrived,
            "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else None,
            "drafted_tokens": self.seq.drafted,
            "accepted_tokens": self.seq.accepted,
        }
        if per_token:
            # per forward of this request: its wall time, the batch size it shared, per device
            # [compute_s, comm_s, disk_wait_s] and the tokens it gained; entry 0 is the prefill
            out["per_token"] = [{"wall_s": w, "batch": b, "prefill": p, "devices": d, "tokens": n}
                                for w, b, p, d, n in self.steps]
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
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.free_slots = list(range(num_slots))
        self.recent: deque[dict] = deque(maxlen=history)
        self.last: Request | None = None        # the last finished request (its per-token timings)
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

    def submit(self, prompt: list[int], params: SamplingParams, ignore_eos: bool = False, *,
               processor=None, logprobs: int | None = None, score_prompt: bool = False,
               speculative: bool = True) -> Request:
        """processor: masks logits before each choice (JSON mode); logprobs: alternatives
        reported per token (None: none); score_prompt: the prompt's tokens scored too;
        speculative: False keeps the generator's drafter away from this request."""
        seq = self.engine.generator.sequence(prompt, params, ignore_eos=ignore_eos, processor=processor,
                                             score_prompt=logprobs if score_prompt else None,
                                             speculative=speculative)
        req = Request(seq, logprobs)
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(req)
            self.cond.notify_all()
        return req

    def position(self, req: Request) -> int:
        """0 when the sequence runs (or will as soon as the scheduler looks), else its place in
        the line of requests waiting for a slot (1 = next)."""
        with self.cond:
            try:
                idx = self.waiting.index(req)
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
            waiting = [{"id": r.id, "position": max(0, i + 1 - free), "waited_s": now - r.arrived,
                        "prompt_tokens": len(r.seq.prompt)} for i, r in enumerate(self.waiting)]
            active = [{"id": r.id, "slot": r.seq.slot, "position": r.seq.pos, "prompt_tokens": len(r.seq.prompt),
                       "completion_tokens": len(r.seq.tokens), "max_tokens": r.seq.budget,
                       "drafted_tokens": r.seq.drafted, "accepted_tokens": r.seq.accepted} for r in self.active]
            last = self.last.summary(per_token=True) if self.last else None
            recent = list(self.recent)
        return {"slots": self.num_slots, "queue_depth": len(waiting), "waiting": waiting,
                "active": active, "last_request": last, "recent": recent, "speculative": self.speculation()}

    def speculation(self) -> dict:
        """The drafter, its tokens per step, and the draft tokens verified and accepted so far."""
        gen, m = self.engine.generator, self.metrics
        drafted, accepted = m.draft_tokens.get(), m.draft_accepted.get()
        return {"drafter": getattr(gen.drafter, "name", None), "draft_tokens": gen.draft_tokens,
                "drafted": drafted, "accepted": accepted,
                "acceptance_rate": accepted / drafted if drafted else None}

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
                    req = self.waiting.popleft()
                    req.seq.slot, req.started = self.free_slots.pop(0), time.monotonic()
                    self.active.append(req)
                    self.metrics.queue_wait.observe(req.started - req.arrived)
            try:
                for req in [r for r in self.active if r.seq.pos == 0]:
                    self._publish(self.engine.generator.prefill(req.seq), [req])
                    self.metrics.prompt_tokens.inc(len(req.seq.prompt))
                decoding = [r for r in self.active if r.cancel_reason is None]
                if decoding:
                    self._publish(self.engine.generator.decode([r.seq for r in decoding]), decoding)
            except CommError as e:
                self._recover(e)
            except Exception as e:  # a bug or a broken device: fail these requests, keep serving
                log.exception("generation step failed")
                with self.cond:
                    self._fail_all(internal_error(f"{type(e).__name__}: {e}"))

    def _publish(self, step: Step, reqs: list[Request]) -> None:
        """Hand one step's tokens to the requests' consumers; end those the step finished."""
        devices = [[b.compute_s, b.comm_s, b.disk_wait_s] for b in step.breakdowns]
        if not step.prefill:
            self.metrics.decode_steps.inc()
            self.metrics.decode_rows.inc(len(reqs))
            self.metrics.step_latency.observe(step.wall_s)
        for req, adv in zip(reqs, step.advances, strict=True):
            req.steps.append((step.wall_s, len(reqs), step.prefill, devices, len(adv.tokens)))
            if adv.tokens and req.first_token is None:
                req.first_token = time.monotonic()
                self.metrics.ttft.observe(req.first_token - req.arrived)
            for j, token in enumerate(adv.tokens):
                lp = None if req.logprobs is None else from_logits(adv.logits[j], token, req.logprobs)
                req.events.put(Token(token, lp))
            self.metrics.generated_tokens.inc(len(adv.tokens))
            self.metrics.draft_tokens.inc(adv.drafted)
            self.metrics.draft_accepted.inc(adv.accepted)
            if adv.finished:
                with self.cond:
                    error = internal_error(adv.error) if adv.error else None
                    self._finish(req, None if error else adv.finished, error)

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
                for req in list(self.active):
                    if not req.done:
                        self._publish(self.engine.generator.prefill(req.seq), [req])
                return
            except CommError as e:
                error = e
                self.metrics.cluster_failures.inc()
                log.warning("cluster failed again while recovering (attempt %d): %s", attempt + 1, e)
        with self.cond:
            self._fail_all(cluster_unavailable(str(error)))

    # ---- bookkeeping (caller holds self.cond) ----

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancel_reason]:
            self.waiting.remove(req)
            self._finish(req, req.cancel_reason)
        for req in [r for r in self.active if r.cancel_reason]:
            self._finish(req, req.cancel_reason)

    def _fail_all(self, error: APIError, include_waiting: bool = False) -> None:
        for req in list(self.active):
            self._finish(req, None, error)
        if include_waiting:
            while self.waiting:
                self._finish(self.waiting.popleft(), None, error)

    def _finish(self, req: Request, reason: str | None, error: APIError | None = None) -> None:
        if req.done:
            return
        req.ended = time.monotonic()
        req.finish_reason = reason or "error"
        if req in self.active:
            self.active.remove(req)
            self.free_slots.append(req.seq.slot)
            self.free_slots.sort()
        self.metrics.finished.inc(1, req.finish_reason)
        self.metrics.request_latency.observe(req.ended - req.arrived)
        self.recent.appendleft(req.summary())
        if req.started is not None:
            self.last = req
        req.events.put(Failed(error) if error else Finished(req.finish_reason))
        self.cond.notify_all()
