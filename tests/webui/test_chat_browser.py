"""The chat page in headless chromium, served by a real `tpi webui` that relays to a real
master: tokens stream in, the answer is right, history goes with the next turn, the stop
button stops generation on the master, and the cluster panel shows every device."""
from __future__ import annotations

import json
import time

import requests

from procs import ARTIFACTS, browser, master, page, wait_for, webui  # noqa: F401  (fixtures)

RECORD_REPLY = """() => {
  window.__snaps = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('.msg.assistant');
    const last = all[all.length - 1];
    if (last) window.__snaps.push({len: last.querySelector('.text').textContent.length,
                                   state: last.dataset.state});
  }).observe(document.getElementById('messages'),
             {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def set_value(page, selector: str, value) -> None:
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(value))


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_reply(page):
    return page.locator(".msg.assistant").last


def scheduler(master) -> dict:
    return requests.get(master.url + "/api/cluster", timeout=10).json()["scheduler"]


def test_cluster_panel_lists_every_device(page, master):
    page.wait_for_selector("#devices .device")
    status = requests.get(master.url + "/api/cluster", timeout=10).json()
    devices = page.locator("#devices .device")
    assert devices.count() == status["world_size"] == 2
    for i, d in enumerate(status["devices"]):
        text = devices.nth(i).inner_text()
        assert d["name"] in text and f"rank {d['rank']}" in text
        assert "memory" in text and "link round-trip" in text
    assert page.locator("#cluster-state").inner_text() == "up"


def test_conversation_streams_answers_and_stops(page, master):
    set_value(page, "#temperature", 0)
    page.evaluate(RECORD_REPLY)

    # 1. A question: tokens appear while the reply is still streaming, and it is right.
    ask(page, "What is the capital of France?")
    page.wait_for_selector('.msg.assistant[data-state="done"]', timeout=60_000)
    answer = last_reply(page).locator(".text").inner_text()
    assert "Paris" in answer
    partial = {s["len"] for s in page.evaluate("window.__snaps") if s["state"] == "streaming" and s["len"] > 0}
    assert len(partial) >= 2, "the reply did not arrive token by token"

    # 2. The next turn carries the history; a long reply is stopped with the stop button.
    page.fill("#max-tokens", "300")
    with page.expect_request("**/api/chat") as req:
        ask(page, "Now write a long story about a dragon who learns to fly.")
    sent = json.loads(req.value.post_data)
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == answer
    assert sent["max_tokens"] == 300 and sent["temperature"] == 0

    page.wait_for_function(
        "() => { const m = document.querySelectorAll('.msg.assistant'); "
        "return m[m.length - 1].querySelector('.text').textContent.length > 30; }", timeout=60_000)
    assert page.locator("#stop").is_enabled()
    page.click("#stop")
    page.wait_for_selector('.msg.assistant[data-state="stopped"]', timeout=10_000)
    stopped_text = last_reply(page).locator(".text").inner_text()

    # the master stopped generating: nothing active, the request ended as cancelled, early
    assert wait_for(lambda: not scheduler(master)["active"], timeout_s=10), "the master kept generating"
    last = scheduler(master)["recent"][0]
    assert last["finish_reason"] == "cancelled" and last["completion_tokens"] < 300
    time.sleep(1.0)
    assert last_reply(page).locator(".text").inner_text() == stopped_text
    assert page.locator("#send").is_enabled() and not page.locator("#stop").is_enabled()

    # 3. The chart shows the stopped reply's per-token breakdown.
    page.wait_for_function(
        f"() => Number(document.getElementById('breakdown-chart').dataset.tokens) == {last['completion_tokens'] - 1}",
        timeout=10_000)
    assert "cancelled" in page.locator("#last-reply").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui-chat.png"))
