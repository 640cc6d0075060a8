"""What the web UI lends the master's API key for, against real processes: a master that
requires a key, a `tpi webui` holding it, and headless chromium on a page of another site.

  * a cross-site page's `text/plain` POST to /api/chat (no CORS preflight needed) reaches
    no generation on the master;
  * the UI's /api/cluster serves the panel's fields, not the status the master keeps
    behind its key (device addresses, the plan);
  * every page carries a Content-Security-Policy, and the chat page runs under it."""
from __future__ import annotations

import http.server
import threading

import pytest
import requests

from procs import browser, metric, start_master, start_webui, wait_for  # noqa: F401  (fixtures)

KEY = "webui-guard-test-key-0123456789abcdef"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
EVIL_PAGE = """<!doctype html><html><body><script>
fetch("%s/api/chat", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                      body: JSON.stringify({messages: [{role: "user", content: "Hi"}], max_tokens: 2})})
  .then(() => { document.title = "sent"; }, () => { document.title = "sent"; });
</script></body></html>"""


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("guards")
    master = start_master(log_dir, "--api-key", KEY)
    try:
        webui = start_webui(log_dir, master.url, "--api-key", KEY)
    except BaseException:
        master.stop()
        raise
    yield master, webui
    webui.stop()
    master.stop()


def chats_answered(master) -> float:
    text = requests.get(master.url + "/metrics", timeout=10).text
    return metric(text, 'tpi_http_requests_total{route="/v1/chat/completions",code="200"}')


@pytest.fixture
def evil_site(keyed):
    """Another origin (another port) serving a page that POSTs to the UI."""
    page = (EVIL_PAGE % keyed[1].url).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cross_site_text_plain_post_starts_no_generation(keyed, evil_site, browser):
    master, webui = keyed
    before = chats_answered(master)
    context = browser.new_context()
    page = context.new_page()
    page.goto(evil_site + "/")
    assert wait_for(lambda: page.title() == "sent", timeout_s=30)
    context.close()
    # the UI's own page still chats: same origin, application/json
    r = requests.post(webui.url + "/api/chat", json=CHAT, timeout=120)
    assert r.status_code == 200 and "data: [DONE]" in r.text
    assert chats_answered(master) == before + 1  # only the same-origin one


@pytest.mark.parametrize("headers,status", [
    ({"Content-Type": "text/plain"}, 415),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
    ({"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403),
])
def test_chat_refuses_foreign_or_non_json_posts(keyed, headers, status):
    master, webui = keyed
    r = requests.post(webui.url + "/api/chat", data=b'{"messages": [{"role": "user", "content": "Hi"}]}',
                      headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_cluster_status_through_the_ui_is_the_panel_view_only(keyed):
    master, webui = keyed
    assert requests.get(master.url + "/api/cluster", timeout=10).status_code == 401
    full = requests.get(master.url + "/api/cluster", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    view = requests.get(webui.url + "/api/cluster", timeout=10).json()
    assert "plan" in full and "process" in full
    assert set(view) == {"model", "world_size", "transport", "devices", "scheduler"}
    assert view["world_size"] == full["world_size"] and len(view["devices"]) == len(full["devices"])
    for d in view["devices"]:
        assert "address" not in d and "blocks" not in d
        assert set(d["memory"]) <= {"used_bytes", "budget_bytes", "kv_cache_bytes", "weights_bytes",
                                    "rss_bytes", "stored_weights_bytes"}


def test_pages_carry_a_csp_and_the_chat_page_runs_under_it(keyed, browser):
    master, webui = keyed
    for path in ("/", "/api/cluster", "/healthz"):
        csp = requests.get(webui.url + path, timeout=10).headers.get("Content-Security-Policy", "")
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(webui.url + "/")
    page.wait_for_selector("#devices .device")
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
    context.close()
    assert not problems, problems
