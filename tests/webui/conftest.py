"""A real master, a real `tpi webui` relaying to it, and headless Debian chromium."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/procs.py
from procs import start_master, start_webui  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    server = start_master(tmp_path_factory.mktemp("master"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def webui(master, tmp_path_factory):
    server = start_webui(tmp_path_factory.mktemp("webui"), master.url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, webui):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(webui.url + "/")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
