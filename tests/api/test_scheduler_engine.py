"""The scheduler on a real in-process engine (SmolLM2, two devices, float32): batched greedy
decoding gives exactly the single-sequence generator's tokens, and a cluster failure is
either recovered (re-prefill, same tokens) or reported (503) while the server keeps serving.

Failures are injected by a thin wrapper around the real cluster that raises CommError after
a chosen forward has run (as when a device drops mid-step, leaving caches half-written)."""
from __future__ import annotations

import threading

import openai
import pytest
import requests

from tpi.cluster.base import Cluster
from tpi.comm.base import CommError
from tpi.settings import RuntimeOptions
from tpi.engine import build_inproc_engine
from tpi.settings import ModelSettings
from tpi.model.sampling import SamplingParams
from tpi_master.http_api import ApiServer
from tpi_master.scheduler import Failed, Finished, Scheduler, Token

QUESTIONS = ["What is the capital of France?", "Write a poem about the sea.", "Explain gravity to a child."]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


class FailingCluster(Cluster):
    def __init__(self, inner: Cluster):
        self.inner, self.world_size = inner, inner.world_size
        self.runners = inner.runners
        self.calls = 0
        self.fail_at: set[int] = set()   # forward numbers (1-based, from now) that fail

    def arm(self, *calls: int) -> None:
        self.calls, self.fail_at = 0, set(calls)

    def forward(self, x, slots, starts, every_position=False):
        self.calls += 1
        out = self.inner.forward(x, slots, starts, every_position)
        if self.calls in self.fail_at:
            raise CommError("device 1 stopped answering (injected)")
        return out

    def breakdowns(self):
        return self.inner.breakdowns()


@pytest.fixture(scope="module")
def engine():
    eng = build_inproc_engine(ModelSettings("smollm2", [1, 1]), RuntimeOptions(dtype="float32", num_slots=len(QUESTIONS)))
    eng.swap_cluster(FailingCluster(eng.cluster))
    yield eng
    eng.cluster.inner.close()


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(engine, prompts):
    """Each prompt alone through the single-sequence generator (the real cluster, slot 0)."""
    return [[ev.token for ev in engine.generator.stream(p, GREEDY)] for p in prompts]


def drain(seq) -> tuple[list[int], object]:
    tokens = []
    while True:
        ev = seq.events.get(timeout=120)
        if isinstance(ev, Token):
            tokens.append(ev.token)
        else:
            return tokens, ev


def run_together(engine, prompts, hook=None):
    sched = Scheduler(engine, len(prompts), on_cluster_failure=hook)
    seqs = [sched.submit(p, GREEDY) for p in prompts]   # all queued before the loop starts
    sched.start()
    try:
        return [drain(s) for s in seqs], sched
    finally:
        sched.close()


def test_batched_greedy_equals_single_sequence_generator(engine, prompts, reference):
    engine.cluster.arm()
    results, sched = run_together(engine, prompts)
    assert [tokens for tokens, _ in results] == reference
    assert all(isinstance(end, Finished) for _, end in results)
    m = sched.metrics
    assert m.decode_rows.get() / m.decode_steps.get() > 2, "the requests did not share decode steps"


def test_batched_greedy_equals_single_sequence_generator_in_bfloat16():
    """The default dtype: rows at different positions attend over their own keys only, so
    they round exactly as when run alone."""
    eng = build_inproc_engine(ModelSettings("smollm2", [1, 1]), RuntimeOptions(dtype="bfloat16", num_slots=len(QUESTIONS)))
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=16)
        prompts = [eng.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
        alone = [[ev.token for ev in eng.generator.stream(p, params)] for p in prompts]
        sched = Scheduler(eng, len(prompts))
        seqs = [sched.submit(p, params) for p in prompts]
        sched.start()
        try:
            assert [drain(s)[0] for s in seqs] == alone
        finally:
            sched.close()
    finally:
        eng.close()


def test_rebuilt_cluster_resumes_every_sequence(engine, prompts, reference):
    rebuilds = []
    engine.cluster.arm(len(prompts) + 5)   # a batched decode step, mid-way

    def rebuild() -> bool:
        rebuilds.append(1)
        return True

    results, sched = run_together(engine, prompts, rebuild)
    assert rebuilds == [1]
    assert [tokens for tokens, _ in results] == reference
    assert sched.metrics.cluster_failures.get() == 1 and sched.metrics.cluster_recoveries.get() == 1


def test_lost_cluster_fails_active_requests_then_serves_again(engine, prompts, reference):
    engine.cluster.arm(len(prompts) + 2)
    sched = Scheduler(engine, len(prompts), on_cluster_failure=lambda: False)
    seqs = [sched.submit(p, GREEDY) for p in prompts]
    sched.start()
    try:
        for seq in seqs:
            tokens, end = drain(seq)
            assert isinstance(end, Failed)
            assert end.error.status == 503 and end.error.code == "cluster_unavailable"
            assert "stopped answering" in end.error.message
        # the next request runs normally
        tokens, end = drain(sched.submit(prompts[0], GREEDY))
        assert tokens == reference[0] and isinstance(end, Finished)
    finally:
        sched.close()


@pytest.fixture
def server(engine):
    """The HTTP API in this process, on the failure-injecting engine; `hook` decides recovery."""
    state = {"rebuild": False}
    srv = ApiServer(engine, "127.0.0.1", 0, on_cluster_failure=lambda: state["rebuild"])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.state = state
    srv.url = f"http://127.0.0.1:{srv.port}"
    yield srv
    srv.shutdown()
    thread.join(timeout=30)


def test_http_reports_cluster_loss_as_503_and_keeps_serving(server, engine, reference):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    engine.cluster.arm(3)
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": msgs, "temperature": 0,
                                                                  "max_tokens": 24}, timeout=120)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "cluster_unavailable" and r.json()["error"]["type"] == "server_error"

    engine.cluster.arm(3)
    stream = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=24, stream=True)
    with pytest.raises(openai.APIError, match="cluster failed"):
        for _ in stream:
            pass

    engine.cluster.arm()
    ok = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=24)
    assert ok.choices[0].message.content == engine.tokenizer.decode(reference[0])


def test_http_client_only_sees_a_pause_when_the_cluster_is_rebuilt(server, engine, reference):
    server.state["rebuild"] = True
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    engine.cluster.arm(4)
    stream = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=24, stream=True,
                                            messages=[{"role": "user", "content": QUESTIONS[1]}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == engine.tokenizer.decode(reference[1])
    status = requests.get(server.url + "/metrics", timeout=10).text
    assert "tpi_cluster_recoveries_total 1" in status
