"""Link emulation in the transport: every outgoing message is delayed like a real link.

A process has one uplink (`Link`): messages leave it one after another at `bandwidth`
(serialization), then fly for `latency` ± `jitter`. The sender computes each message's
delivery time when it is queued and a per-connection task sends it then, so a delayed
message never blocks compute or the messages queued behind it (pipelining):

    start      = max(now, uplink free)          # wait for earlier messages to leave
    uplink free = start + wire_bytes * 8 / bandwidth
    deliver_at = uplink free + latency + uniform(-jitter, +jitter)

On one connection delivery order is kept (TCP does not reorder), so jitter never makes a
later message overtake an earlier one. The Linux netem qdisc would do this in the kernel,
but it is missing on some kernels (our CI's among them); this works everywhere. Packet
loss is the one part the transport cannot emulate (TCP would retransmit): a spec's `loss=` is
accepted here and applied by the netem sidecar (services/netem) in the kernel.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("tpi.comm")
_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_RATE = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_SEGMENT = 1448     # TCP payload per segment at MTU 1500
_SEG_OVERHEAD = 66  # Ethernet + IP + TCP (with timestamps) headers per segment
_WS_OVERHEAD = 14   # worst-case WebSocket frame header
_KEYS = {"latency": _TIME, "bandwidth": _RATE, "jitter": _TIME, "loss": {"": 1.0, "%": 1.0}}


@dataclass(frozen=True)
class LinkSpec:
    """One link profile, as `--link` and the appliance's EDGE_LINK write it. The one parser
    of link specs: the transport (Link below) and the netem sidecar both read them here."""
    latency: float = 0.0            # one-way delay, seconds
    bandwidth: float | None = None  # bits per second; None = unlimited
    jitter: float = 0.0             # uniform ± seconds around latency
    loss: float = 0.0               # percent of packets lost: the kernel's netem only (TCP
                                    # retransmits; the transport cannot drop a frame)

    @classmethod
    def parse(cls, text: str | None) -> LinkSpec | None:
        """'latency=5ms,bandwidth=300mbit,jitter=1ms,loss=0.1%' -> LinkSpec ('rate' is
        another name for bandwidth); '' or 'none' -> None."""
        if text is None or text.strip().lower() in ("", "none", "off"):
            return None
        values: dict[str, float] = {}
        for item in text.split(","):
            key, sep, raw = (s.strip().lower() for s in item.partition("="))
            key = "bandwidth" if key == "rate" else key
            m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z%]*)", raw)
            if not sep or key not in _KEYS:
                raise ValueError(f"link spec {text!r}: expected {', '.join(_KEYS)}=; "
                                 f"got {item!r}")
            if not m:
                raise ValueError(f"link spec {text!r}: cannot read {raw!r}")
            number, unit = float(m.group(1)), m.group(2)
            table = _KEYS[key]
            if unit not in table:
                raise ValueError(f"link spec {text!r}: unit {unit!r} for {key} not in "
                                 f"{sorted(table)}")
            values[key] = number * table[unit]
        if values.get("bandwidth") == 0:
            raise ValueError(f"link spec {text!r}: bandwidth must be > 0")
        if values.get("loss", 0) > 100:
            raise ValueError(f"link spec {text!r}: loss is a percentage, at most 100%")
        return cls(**values)

    def __str__(self) -> str:
        parts = [f"latency={self.latency * 1e3:g}ms"]
        if self.bandwidth:
            parts.append(f"bandwidth={self.bandwidth / 1e6:g}mbit")
        if self.jitter:
            parts.append(f"jitter={self.jitter * 1e3:g}ms")
        if self.loss:
            parts.append(f"loss={self.loss:g}%")
        return ",".join(parts)


def wire_bytes(nbytes: int) -> int:
    """Bytes a message of `nbytes` occupies on an Ethernet link, headers included."""
    n = nbytes + _WS_OVERHEAD
    return n + _SEG_OVERHEAD * max(1, math.ceil(n / _SEGMENT))


class Link:
    """One process's emulated uplink. Used from the event-loop thread only."""

    def __init__(self, spec: LinkSpec, seed: int | None = None):
        if spec.loss:
            log.warning("link %s: the transport does not drop frames (TCP retransmits); "
                        "packet loss is emulated by the kernel's netem only", spec)
        self.spec = spec
        self._free_at = 0.0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()   # the event loop and the engine thread both send

    def schedule(self, nbytes: int, now: float) -> float:
        """Delivery time (same clock as `now`, time.monotonic) of an `nbytes` message
        queued at `now`."""
        with self._lock:
            return self._schedule(nbytes, now)

    def _schedule(self, nbytes: int, now: float) -> float:
        spec = self.spec
        start = max(now, self._free_at)
        if spec.bandwidth:
            start += wire_bytes(nbytes) * 8 / spec.bandwidth
        self._free_at = start
        delay = spec.latency
        if spec.jitter:
            delay = max(0.0, delay + self._rng.uniform(-spec.jitter, spec.jitter))
        return start + delay


class Pacer:
    """Sends data-plane frames (dataplane.py) at their emulated delivery times (or at once:
    large frames) from one background thread, so they never block the engine thread.
    Frames of one connection leave in order (delivery times never decrease per socket)."""

    _shared: Pacer | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, object, bytes]] = []
        self._order = itertools.count()
        self._last: dict[int, float] = {}       # id(socket) -> its last delivery time
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="tpi-link-pacer", daemon=True).start()

    @classmethod
    def shared(cls) -> Pacer:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def send_at(self, at: float, dsock, data: bytes) -> None:
        """Send `data` on `dsock` (a DataSocket) at monotonic time `at`."""
        with self._cond:
            at = max(at, self._last.get(id(dsock), 0.0))
            self._last[id(dsock)] = at
            heapq.heappush(self._heap, (at, next(self._order), dsock, data))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                _, _, dsock, data = heapq.heappop(self._heap)
            try:
                dsock.write_now([data])
            except Exception as e:  # noqa: BLE001 - the receiver sees the lost connection
                log.debug("paced send failed: %s", e)
            finally:
                dsock.sent()
