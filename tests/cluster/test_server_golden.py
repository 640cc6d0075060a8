"""The Hugging Face golden equivalence through the server's path: greedy tokens from the
master's HTTP API, with real worker processes over loopback WebSockets and uneven splits,
equal transformers' (the in-process twin is tests/engine/test_hf_equivalence.py).

The API answers text, so the reference tokens go through the server's own detokenizer
(TextStream) and the texts are compared, with the completion's token count."""
from __future__ import annotations

import threading

import pytest
import requests

from procs import ServedCluster, metric
from reference import TINY_FAMILIES, hf_greedy
from tpi.tokenizer import ChatTokenizer
from tpi_master.textstream import TextStream

NEW_TOKENS = 16
RANDOM_PROMPT = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]


def complete(url: str, prompt: list[int], new_tokens: int = NEW_TOKENS) -> dict:
    r = requests.post(url + "/v1/completions", timeout=300, json={
        "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def as_served(tokenizer, tokens: list[int]) -> str:
    """The text the server streams for these tokens."""
    stream = TextStream(tokenizer)
    return "".join(stream.push(t) for t in tokens) + stream.finish()


def assert_matches(tokenizer, answer: dict, expected: list[int]) -> None:
    assert answer["usage"]["completion_tokens"] == len(expected)
    assert answer["choices"][0]["text"] == as_served(tokenizer, expected)


@pytest.mark.parametrize("weights", [[1.0, 2.0], [2.0, 1.0, 1.0]], ids=["N2", "N3"])
def test_smollm2_served_greedy_matches_transformers(smollm2_dir, tmp_path, weights):
    """Two requests at once: they share decode steps, and each still equals transformers.
    (Prompts whose answers outlast NEW_TOKENS: the reference suppresses the end-of-turn token.)"""
    tok = ChatTokenizer(smollm2_dir)
    prompts = [tok.encode_chat([{"role": "user", "content": q}])
               for q in ("Write a short poem about the sea.", "Explain gravity to a child.")]
    expected = [hf_greedy(smollm2_dir, p, NEW_TOKENS) for p in prompts]
    with ServedCluster(tmp_path, weights, "--dtype", "float32", "--slots", "2") as served:
        answers: dict[int, dict] = {}
        start = threading.Barrier(len(prompts))

        def ask(i: int) -> None:
            start.wait()
            answers[i] = complete(served.master.url, prompts[i])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shown = requests.get(served.master.url + "/metrics", timeout=10).text
    assert metric(shown, "tpi_decode_rows_total") > metric(shown, "tpi_decode_steps_total"), "no shared step"
    for i, want in enumerate(expected):
        assert_matches(tok, answers[i], want)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_random_model_served_greedy_matches_transformers(tiny_model, tmp_path, family):
    model_dir = tiny_model(family)
    expected = hf_greedy(model_dir, RANDOM_PROMPT, NEW_TOKENS)
    assert len(set(expected)) > 3, "the reference output is degenerate; the test would prove little"
    with ServedCluster(tmp_path, [1.0, 1.0, 3.0], "--model", str(model_dir), "--dtype", "float32") as served:
        answer = complete(served.master.url, RANDOM_PROMPT)
    assert_matches(ChatTokenizer(model_dir), answer, expected)
