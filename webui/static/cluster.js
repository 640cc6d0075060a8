// The cluster panel: devices with memory in use against budget and link latency, the
// scheduler's queue, and the per-token time chart of the last reply. Polls /api/cluster.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const devicesEl = $("devices"), stateEl = $("cluster-state"), summaryEl = $("cluster-summary");
  const chartEl = $("breakdown-chart"), deviceSel = $("chart-device"), lastEl = $("last-reply");
  let last = null;   // the last status received

  const mib = (b) => (b === null || b === undefined ? "?" : (b / 1048576).toFixed(0) + " MiB");
  const ms = (s) => (s === null || s === undefined ? "—" : (s * 1000).toFixed(1) + " ms");

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderDevice(d) {
    const li = el("li", "device");
    li.dataset.rank = d.rank;
    const head = el("div");
    head.append(el("span", "name", d.name || `device ${d.rank}`), " ",
                el("span", "role", `rank ${d.rank} · ${d.role || ""} · ${d.state || ""}`));
    li.append(head);
    const mem = d.memory || {};
    // What the device holds (weights + KV cache), else its process's resident memory.
    const known = (v) => v !== null && v !== undefined;
    const used = known(mem.used_bytes) ? mem.used_bytes : mem.rss_bytes, budget = mem.budget_bytes;
    const bar = el("div", "bar"), fill = el("span");
    if (budget) {
      const frac = Math.min(1, (used || 0) / budget);
      fill.style.width = (frac * 100).toFixed(1) + "%";
      if (frac > 0.9) bar.classList.add("high");
    } else {
      bar.classList.add("unbounded");
      fill.style.width = "100%";
    }
    bar.append(fill);
    let memText = "memory not reported yet";
    if (known(used)) {
      memText = `memory ${mib(used)}` + (budget ? ` of ${mib(budget)}` : " (no budget set)") +
        (mem.kv_cache_bytes ? ` (KV cache ${mib(mem.kv_cache_bytes)})` : "");
    }
    li.append(el("div", "small memory", memText), bar);
    const link = d.link || {};
    const rtt = link.rtt_ms === null || link.rtt_ms === undefined ? (link.note || "—") : `${link.rtt_ms.toFixed(2)} ms`;
    const shard = d.shard || {};
    li.append(el("div", "small link", `link round-trip: ${rtt}`));
    if (shard.q_heads) {
      li.append(el("div", "small shard",
        `heads ${shard.q_heads[0]}–${shard.q_heads[1] - 1}, MLP columns ${shard.mlp_cols[0]}–${shard.mlp_cols[1] - 1}`));
    }
    return li;
  }

  function chartRows(lastRequest) {
    const steps = (lastRequest && lastRequest.per_token) || [];
    const which = deviceSel.value;
    return steps.filter((s) => !s.prefill).map((s) => {
      const devs = s.devices || [];
      if (!devs.length) return [s.wall_s, 0, 0];
      if (which !== "mean") return devs[Number(which)] || [0, 0, 0];
      const sum = [0, 0, 0];
      devs.forEach((d) => { for (let k = 0; k < 3; k++) sum[k] += d[k]; });
      return sum.map((x) => x / devs.length);
    });
  }

  function renderChart() {
    const lr = last && last.scheduler && last.scheduler.last_request;
    window.drawBreakdown(chartEl, chartRows(lr));
    if (!lr) { lastEl.textContent = ""; return; }
    const tps = lr.decode_tokens_per_s ? `${lr.decode_tokens_per_s.toFixed(1)} tokens/s` : "";
    lastEl.textContent = `${lr.completion_tokens} tokens (${lr.finish_reason}) · first token ${ms(lr.ttft_s)} · ${tps}`;
  }

  function render(status) {
    const prevRequest = last && last.scheduler && last.scheduler.last_request && last.scheduler.last_request.id;
    last = status;
    stateEl.textContent = "up";
    stateEl.className = "badge ok";
    const sch = status.scheduler || {};
    summaryEl.textContent = `${status.model ? status.model.name : ""} · ${status.world_size} devices (${status.transport}) · ` +
      `decoding ${(sch.active || []).length}/${sch.slots} · waiting ${sch.queue_depth || 0}`;
    devicesEl.replaceChildren(...(status.devices || []).map(renderDevice));
    const want = ["mean", ...(status.devices || []).map((d) => String(d.rank))];
    const have = Array.from(deviceSel.options).map((o) => o.value);
    if (want.join() !== have.join()) {
      const keep = deviceSel.value;
      deviceSel.replaceChildren(...want.map((v) => {
        const o = el("option", null, v === "mean" ? "mean of devices" : `rank ${v}`);
        o.value = v;
        return o;
      }));
      deviceSel.value = want.includes(keep) ? keep : "mean";
    }
    const lr = sch.last_request;
    if (!lr || lr.id !== prevRequest || !chartEl.dataset.drawn) {
      renderChart();
      chartEl.dataset.drawn = "1";
      chartEl.dataset.tokens = lr ? lr.per_token.filter((s) => !s.prefill).length : 0;
    }
  }

  async function refresh() {
    try {
      const resp = await fetch("/api/cluster", { cache: "no-store" });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      render(await resp.json());
    } catch (e) {
      stateEl.textContent = "unreachable";
      stateEl.className = "badge down";
      summaryEl.textContent = String(e.message || e);
    }
  }

  deviceSel.addEventListener("change", renderChart);
  document.addEventListener("reply-finished", () => setTimeout(refresh, 300));
  window.addEventListener("resize", renderChart);
  refresh();
  setInterval(refresh, 2000);
})();
