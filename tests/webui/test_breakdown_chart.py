"""The web UI's per-token chart in headless chromium: after a reply, each decode step's bar is
drawn with compute, communication and disk-wait segments as tall as the master's own figures
for that step (/api/cluster, scheduler.last_request.per_token) say, for the mean of the devices
and for one device picked in the selector. Read back from the canvas's pixels. Two masters:
weights in memory (disk wait ~0), and weights streamed from disk under a small memory budget
(every segment tall)."""
from __future__ import annotations

import math

import pytest
import requests

from procs import browser, page, start_master, webui  # noqa: F401  (fixtures)

# The chart's layout (webui/static/chart.js): margins in CSS pixels.
LEFT, RIGHT, TOP, BOTTOM = 38, 6, 8, 18

MEASURE = """() => {
  const c = document.getElementById('breakdown-chart');
  const dpr = window.devicePixelRatio || 1;
  const img = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const style = getComputedStyle(document.documentElement);
  const probe = document.createElement('canvas').getContext('2d');
  const colors = ['--compute', '--comm', '--disk'].map((v) => {
    probe.fillStyle = style.getPropertyValue(v).trim();
    probe.fillRect(0, 0, 1, 1);
    return Array.from(probe.getImageData(0, 0, 1, 1).data.slice(0, 3));
  });
  const cssW = c.width / dpr, cssH = c.height / dpr, n = Number(c.dataset.tokens);
  const step = (cssW - %d - %d) / n;
  const bars = [];
  for (let i = 0; i < n; i++) {
    const x = Math.round((%d + i * step + step / 2) * dpr);
    const count = [0, 0, 0];
    for (let y = 0; y < c.height; y++) {
      const o = (y * c.width + x) * 4;
      colors.forEach((rgb, k) => {
        if (img[o + 3] > 250 && rgb.every((v, j) => Math.abs(img[o + j] - v) <= 2)) count[k] += 1;
      });
    }
    bars.push(count.map((p) => p / dpr));
  }
  return {bars, height: cssH - %d - %d};
}""" % (LEFT, RIGHT, LEFT, TOP, BOTTOM)


@pytest.fixture(scope="module", params=["in memory", "from disk"])
def master(request, tmp_path_factory):
    """`tpi master --devices 2` serving SmolLM2; "from disk": a 150 MB budget per device holds
    a few blocks at a time, the rest is read from the store while decoding."""
    extra = () if request.param == "in memory" else ("--memory-budget", "150MB", "--max-seq", "256")
    server = start_master(tmp_path_factory.mktemp("master"), *extra)
    server.from_disk = request.param == "from disk"
    yield server
    server.stop()


def nice_ceil(x: float) -> float:
    """The chart's axis top: the smallest 1, 2, 2.5, 5 or 10 x 10^k at or above x."""
    p = 10 ** math.floor(math.log10(x))
    return next(m * p for m in (1, 2, 2.5, 5, 10) if m * p >= x)


def expected_heights(steps: list[dict], device: int | None, height: float) -> list[list[float]]:
    rows = []
    for s in steps:
        devs = s["devices"]
        rows.append(devs[device] if device is not None else [sum(d[k] for d in devs) / len(devs) for k in range(3)])
    top_ms = nice_ceil(max(sum(r) for r in rows) * 1000)
    return [[v * 1000 / top_ms * height for v in r] for r in rows]


def assert_drawn(page, steps, device, from_disk: bool):
    got = page.evaluate(MEASURE)
    want = expected_heights(steps, device, got["height"])
    assert len(got["bars"]) == len(want)
    for bar, exp in zip(got["bars"], want):
        for k in range(3):      # compute, communication, disk; a segment's two edges may blend
            assert abs(bar[k] - exp[k]) <= 2.0, (k, bar, exp)
    assert sum(b[0] for b in got["bars"]) > 5 * len(want), "compute time is drawn"
    if from_disk:
        assert max(b[2] for b in got["bars"]) >= 3, "disk wait is drawn"


def test_each_bar_shows_the_steps_compute_communication_and_disk_time(page, master):
    page.fill("#max-tokens", "12")
    page.fill("#prompt", "Name three rivers in Europe.")
    page.press("#prompt", "Enter")
    page.wait_for_selector('.msg.assistant[data-state="done"]', timeout=60_000)
    last = requests.get(master.url + "/api/cluster", timeout=10).json()["scheduler"]["last_request"]
    steps = [s for s in last["per_token"] if not s["prefill"]]
    assert len(steps) >= 5 and all(len(s["devices"]) == 2 for s in steps)
    page.wait_for_function(f"() => Number(document.getElementById('breakdown-chart').dataset.tokens) == {len(steps)}",
                           timeout=10_000)
    assert_drawn(page, steps, None, master.from_disk)
    page.select_option("#chart-device", "1")
    assert_drawn(page, steps, 1, master.from_disk)
