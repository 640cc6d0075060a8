"""Speculative decoding through a real master (`tpi master --devices 2`, its default drafter:
prompt lookup): an input-grounded request drafts and accepts tokens and answers exactly the
text of the same request with speculation switched off; /metrics and /api/cluster count
the drafts; a malformed switch is refused."""
from __future__ import annotations

import requests

from procs import master, metric  # noqa: F401  (master: a pytest fixture)

PARAGRAPH = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt wind. "
             "Every night the keeper climbed the spiral stairs to light the lamp for the fishing boats.")
REWRITE = [{"role": "user", "content": f"Repeat this paragraph exactly, word for word:\n\n{PARAGRAPH}"}]


def chat(master, **extra) -> requests.Response:
    return requests.post(master.url + "/v1/chat/completions", timeout=300, json={
        "messages": REWRITE, "temperature": 0, "max_tokens": 48, **extra})


def counters(master) -> tuple[float, float]:
    text = requests.get(master.url + "/metrics", timeout=10).text
    return metric(text, "tpi_draft_tokens_total"), metric(text, "tpi_draft_accepted_tokens_total")


def test_speculation_drafts_accepts_and_keeps_the_greedy_text(master):
    d0, a0 = counters(master)
    on = chat(master)
    d1, a1 = counters(master)
    off = chat(master, speculative=False)
    d2, a2 = counters(master)
    assert on.status_code == off.status_code == 200
    assert on.json()["choices"][0]["message"]["content"] == off.json()["choices"][0]["message"]["content"]
    assert d1 > d0 and a1 > a0, "prompt lookup proposed nothing on a copy of its input"
    assert (d2, a2) == (d1, a1), "a request with speculative: false was given drafts"

    status = requests.get(master.url + "/api/cluster", timeout=10).json()["scheduler"]
    spec = status["speculative"]
    assert spec["drafter"] == "ngram" and spec["draft_tokens"] >= 1
    assert spec["drafted"] == d2 and spec["accepted"] == a2 and 0 < spec["acceptance_rate"] <= 1
    recent = status["recent"]
    assert recent[0]["drafted_tokens"] == 0 and recent[1]["accepted_tokens"] > 0


def test_a_malformed_speculative_switch_is_refused(master):
    r = chat(master, speculative="no")
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculative"
