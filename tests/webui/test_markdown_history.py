"""The chat page's markdown and saved conversations, in headless chromium against a real
`tpi webui` and master: replies render code blocks and lists but never HTML from the model,
and conversations survive a reload (localStorage) and go with the next request."""
from __future__ import annotations

import json

from procs import browser, master, page, webui  # noqa: F401  (fixtures)

HOSTILE = ("Here is code:\n```python\nprint('<b>hi</b>')\n```\n"
           "Steps:\n- first **bold**\n- second `x < y`\n1. one\n2. two\n"
           "<img src=x onerror=\"window.pwned = 1\"><script>window.pwned = 2</script>")


def saved(page) -> list:
    return page.evaluate("() => JSON.parse(localStorage.getItem('tpi.conversations') || '[]')")


def test_markdown_renders_without_html_from_the_model(page):
    page.evaluate("""(text) => {
        localStorage.setItem('tpi.conversations', JSON.stringify([{id: 'c1', title: 't', updated: 1,
            messages: [{role: 'user', content: 'show me'}, {role: 'assistant', content: text}]}]));
        localStorage.setItem('tpi.current', 'c1');
    }""", HOSTILE)
    page.reload()
    reply = page.locator(".msg.assistant .text").last
    assert reply.locator("pre code").inner_text() == "print('<b>hi</b>')"
    assert reply.locator("pre code").get_attribute("data-lang") == "python"
    assert reply.locator("ul > li").count() == 2 and reply.locator("ol > li").count() == 2
    assert reply.locator("ul > li strong").inner_text() == "bold"
    assert reply.locator("ul > li code").inner_text() == "x < y"
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    assert page.evaluate("window.pwned") is None
    assert '<img src=x onerror="window.pwned = 1"><script>' in reply.inner_text()
    # a fence still open while the reply streams is already a code block
    assert page.evaluate("""() => { const d = document.createElement('div');
        renderMarkdown('run:\\n```sh\\nls -l', d); return d.querySelector('pre code').textContent; }""") == "ls -l"


def test_conversations_survive_a_reload(page):
    page.eval_on_selector("#temperature", "(e) => { e.value = 0; e.dispatchEvent(new Event('input')); }")
    page.fill("#max-tokens", "12")
    page.fill("#prompt", "What is the capital of France?")
    page.press("#prompt", "Enter")
    page.wait_for_selector('.msg.assistant[data-state="done"]', timeout=60_000)
    answer = page.locator(".msg.assistant .text").last.inner_text()
    [conv] = saved(page)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["title"] == "What is the capital of France?"

    page.reload()
    assert page.locator(".msg.user").inner_text() == "What is the capital of France?"
    assert page.locator(".msg.assistant .text").inner_text() == answer
    with page.expect_request("**/api/chat") as req:       # the restored turns go with the next question
        page.fill("#prompt", "And of Italy?")
        page.press("#prompt", "Enter")
    assert [m["role"] for m in json.loads(req.value.post_data)["messages"]] == ["user", "assistant", "user"]
    page.wait_for_selector('.msg.assistant[data-state="done"] >> nth=1', timeout=60_000)

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#conversations li").count() == 2
    page.locator("#conversations button", has_text="What is the capital").click()
    assert page.locator(".msg.user").count() == 2
    assert [len(c["messages"]) for c in saved(page)] == [0, 4]      # the new chat, then the first
