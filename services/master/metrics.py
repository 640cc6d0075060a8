"""Counters, gauges and histograms rendered in the Prometheus text format (version 0.0.4).

Written by hand: the format is a few lines per metric and the master should not need
prometheus_client for it.
"""
from __future__ import annotations

import bisect
import threading
from typing import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0}

    def inc(self, amount: float = 1, *labels: str) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self.values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when the metrics are rendered."""

    kind = "gauge"

    def __init__(self, name, help, read: Callable[[], float]):
        super().__init__(name, help)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.read())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets=LATENCY_BUCKETS):
        super().__init__(name, help)
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        lines, running = self.header(), 0
        for bound, c in zip(self.bounds + (float("inf"),), counts, strict=True):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_num(float(bound))}"}} {running}')
        lines += [f"{self.name}_sum {_num(total)}", f"{self.name}_count {running}"]
        return lines


class Registry:
    def __init__(self):
        self.metrics: list[_Metric] = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


class MasterMetrics:
    """Every metric the master exports. Gauges read the scheduler's state via callbacks."""

    def __init__(self, queue_depth: Callable[[], float], active: Callable[[], float], slots: Callable[[], float]):
        r = self.registry = Registry()
        self.http_requests = r.add(Counter(
            "tpi_http_requests_total", "HTTP requests answered, by route and status code.", ("route", "code")))
        self.finished = r.add(Counter(
            "tpi_generations_total", "Generations ended, by finish reason (stop, length, cancelled, error).",
            ("reason",)))
        self.prompt_tokens = r.add(Counter("tpi_prompt_tokens_total", "Prompt tokens prefilled for requests."))
        self.generated_tokens = r.add(Counter("tpi_generated_tokens_total", "Tokens generated."))
        self.decode_steps = r.add(Counter(
            "tpi_decode_steps_total", "Batched decode steps (one cluster forward each)."))
        self.decode_rows = r.add(Counter(
            "tpi_decode_rows_total", "Sequences summed over decode steps (rows / steps = mean batch size)."))
        self.draft_tokens = r.add(Counter(
            "tpi_draft_tokens_total", "Draft tokens the cluster verified (speculative decoding)."))
        self.draft_accepted = r.add(Counter(
            "tpi_draft_accepted_tokens_total", "Draft tokens accepted (each one a token gained without its own forward)."))
        self.cluster_failures = r.add(Counter(
            "tpi_cluster_failures_total", "Cluster forwards that failed with a communication error."))
        self.cluster_recoveries = r.add(Counter(
            "tpi_cluster_recoveries_total", "Failures after which the cluster was rebuilt and generation resumed."))
        r.add(Gauge("tpi_queue_depth", "Requests waiting for a free sequence slot.", queue_depth))
        r.add(Gauge("tpi_active_sequences", "Sequences decoding now.", active))
        r.add(Gauge("tpi_sequence_slots", "Sequences that can decode together (KV-cache slots).", slots))
        self.queue_wait = r.add(Histogram("tpi_queue_wait_seconds", "Time from arrival to the start of prefill."))
        self.ttft = r.add(Histogram("tpi_time_to_first_token_seconds", "Time from arrival to the first generated token."))
        self.request_latency = r.add(Histogram("tpi_request_duration_seconds", "Time from arrival to the end of generation."))
        self.step_latency = r.add(Histogram("tpi_decode_step_seconds", "Wall time of one batched decode step.",
                                            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)))

    def render(self) -> str:
        return self.registry.render()
