"""Issue 16 finding 12: workers learned the chosen tokens from the output head's exchange.

The candidates (every device's top-K token ids and logits) were all-reduced, so every
worker received all of them each step; now they are gathered to the master only. This
test runs `tpi master` with two workers that are the real `tpi worker` code with their
receiving sockets wrapped (spy_worker.py), generates a reply over HTTP, and reads every
frame the workers received: hidden states only (ForwardStep's and the layers' sums), never
a tensor holding the reply's token ids. What the hidden states still reveal (the prompt's
and each new token's embedding rows) is stated in README and docs/join-a-device.md."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import requests
import torch

from procs import Server, free_port
from spy_worker import read_log
from tpi.protocol import ForwardStep, Reduced, decode

SPY = Path(__file__).with_name("spy_worker.py")


def _tensors(msg) -> list[torch.Tensor]:
    return [getattr(msg, f.name) for f in dataclasses.fields(msg)
            if isinstance(getattr(msg, f.name), torch.Tensor)]


def test_a_worker_receives_no_output_head_candidates_nor_the_chosen_tokens(tmp_path, smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    hub_port, http_port, token = free_port(), free_port(), "privacy-test-join-token"
    logs = [tmp_path / f"w{r}.frames" for r in (1, 2)]
    workers = [subprocess.Popen([sys.executable, str(SPY), str(log), "worker", "--master",
                                 f"ws://127.0.0.1:{hub_port}", "--join-token", token,
                                 "--name", log.stem, "--timeout", "10"],
                                stdout=open(tmp_path / f"{log.stem}.log", "wb"),
                                stderr=subprocess.STDOUT) for log in logs]
    master = Server("master", ["master", "--http", f"127.0.0.1:{http_port}", "--listen",
                               f"127.0.0.1:{hub_port}", "--devices", "3", "--join-token", token,
                               "--timeout", "10"], http_port, tmp_path)
    try:
        master.wait_ready()
        r = requests.post(master.url + "/v1/completions", timeout=300, json={
            "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 16,
            "temperature": 0})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
    finally:
        master.stop()
        for w in workers:
            w.kill()
            w.wait(30)
    ids = set(AutoTokenizer.from_pretrained(smollm2_dir)(text, add_special_tokens=False).input_ids)
    hidden = AutoConfig.from_pretrained(smollm2_dir).hidden_size
    assert len(ids) >= 3, text

    for log in logs:
        kinds, tensors = set(), []
        for channel, frame in read_log(str(log)):
            msg = decode(frame, max_bytes=1 << 30).msg
            kinds.add(type(msg))
            tensors += [(channel, type(msg).__name__, t) for t in _tensors(msg)]
        assert {ForwardStep, Reduced} <= kinds, f"{log.stem} took no part: {kinds}"
        for channel, kind, t in tensors:
            # hidden states, (batch, tokens, hidden): the head's (rows, N, 2, K) never comes
            assert t.shape[-1] == hidden, f"{log.stem} received {kind} {list(t.shape)} on {channel}"
            held = set(t.flatten().tolist())
            assert not ids <= held, f"{log.stem} received the reply's token ids in {kind}"
