"""What a new user sees first, against a real master and `tpi webui` in chromium: the
sampling defaults are the model's own (the embedded SmolLM2 decodes greedily and answers the
capital of France with Paris, through the API without sampling fields and through the page
without touching a control), and the cluster panel shows each device's memory."""
from __future__ import annotations

import re

import requests

from procs import browser, master, page, webui  # noqa: F401  (fixtures)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_api_defaults_are_the_models(master):
    card = requests.get(master.url + "/v1/models", timeout=10).json()["data"][0]
    assert card["generation_defaults"]["temperature"] == 0.0  # SmolLM2's generation_config: no do_sample
    chat = master.url + "/v1/chat/completions"
    plain = requests.post(chat, json={"messages": QUESTION, "max_tokens": 16}, timeout=120).json()
    greedy = requests.post(chat, json={"messages": QUESTION, "max_tokens": 16, "temperature": 0}, timeout=120).json()
    text = plain["choices"][0]["message"]["content"]
    assert text == greedy["choices"][0]["message"]["content"] and "Paris" in text


def test_page_answers_paris_with_its_defaults_and_shows_device_memory(page, master):
    assert page.input_value("#temperature") == "0"
    page.fill("#prompt", QUESTION[0]["content"])
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
    assert "Paris" in page.locator(".msg.assistant .text").last.inner_text()
    page.wait_for_selector("#devices .device")
    memory = page.locator("#devices .device .memory").all_inner_texts()
    assert len(memory) == 2
    for text in memory:
        assert re.match(r"memory \d+ MiB", text), text
