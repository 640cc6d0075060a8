// A stacked bar chart on a plain canvas: one bar per generated token, split into
// compute / communication / disk-wait milliseconds. No libraries.
"use strict";

window.drawBreakdown = function drawBreakdown(canvas, rows) {
  // rows: [[compute_s, comm_s, disk_s], ...] one per token (the prefill is left out by the caller)
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || canvas.width, cssH = canvas.clientHeight || canvas.height;
  canvas.width = Math.round(cssW * dpr);
  canvas.height = Math.round(cssH * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const style = getComputedStyle(document.documentElement);
  const colors = ["--compute", "--comm", "--disk"].map((v) => style.getPropertyValue(v).trim());
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#667085";
  if (!rows.length) {
    ctx.fillText("no reply yet", 10, cssH / 2);
    return;
  }
  const left = 38, right = 6, top = 8, bottom = 18;
  const w = cssW - left - right, h = cssH - top - bottom;
  const totals = rows.map((r) => r[0] + r[1] + r[2]);
  const maxMs = niceCeil(Math.max(...totals) * 1000);
  // axes and grid
  ctx.strokeStyle = "#e3e6eb";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + h - (h * i) / 4;
    ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(left + w, y + 0.5); ctx.stroke();
    const label = (maxMs * i) / 4;
    ctx.fillText(label >= 10 ? label.toFixed(0) : label.toFixed(1), 2, y + 4);
  }
  ctx.fillText("ms", 2, top + h + 14);
  ctx.fillText(`${rows.length} decode steps (the prefill is left out)`, left, top + h + 14);
  // bars
  const step = w / rows.length, bar = Math.max(1, step * 0.8);
  rows.forEach((r, i) => {
    let y = top + h;
    for (let k = 0; k < 3; k++) {
      const bh = (r[k] * 1000 / maxMs) * h;
      if (bh <= 0) continue;
      ctx.fillStyle = colors[k];
      ctx.fillRect(left + i * step + (step - bar) / 2, y - bh, bar, bh);
      y -= bh;
    }
  });
};

function niceCeil(x) {
  if (!(x > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}
