// The chat: multi-turn history kept in the page, replies streamed from /api/chat
// (server-sent events relayed from the master), a stop button that aborts the stream.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const messagesEl = $("messages"), promptEl = $("prompt"), sendBtn = $("send"), stopBtn = $("stop");
  const tempEl = $("temperature"), tempOut = $("temperature-value"), maxEl = $("max-tokens"), systemEl = $("system");

  const history = [];          // [{role, content}] of finished turns
  let controller = null;       // AbortController of the reply in flight

  // The slider starts at the model's default (rendered by the server); until it is moved,
  // requests leave temperature out and the master applies the model's own settings.
  tempEl.addEventListener("input", () => { tempOut.textContent = tempEl.value; tempEl.dataset.touched = "1"; });

  function bubble(role, text) {
    $("empty")?.remove();
    const el = document.createElement("div");
    el.className = "msg " + role;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    el.appendChild(body);
    messagesEl.appendChild(el);
    messagesEl.scrollTop = messagesEl.scrollHeight;
    return el;
  }

  function setMeta(el, text) {
    let meta = el.querySelector(".meta");
    if (!meta) { meta = document.createElement("span"); meta.className = "meta"; el.appendChild(meta); }
    meta.textContent = text;
  }

  function setBusy(busy) {
    sendBtn.disabled = busy;
    stopBtn.disabled = !busy;
    document.body.dataset.busy = busy ? "1" : "";
  }

  // Parse a stream of server-sent events; calls onData(payloadString) per "data:" event.
  async function readEvents(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data && onData(data) === false) return;
      }
    }
  }

  async function send(text) {
    const user = { role: "user", content: text };
    bubble("user", text);
    const el = bubble("assistant", "");
    const textEl = el.querySelector(".text");
    el.dataset.state = "streaming";
    setBusy(true);
    controller = new AbortController();
    const messages = [];
    if (systemEl.value.trim()) messages.push({ role: "system", content: systemEl.value.trim() });
    messages.push(...history, user);
    const started = performance.now();
    let firstAt = null, finish = null, usage = null, error = null;
    try {
      const resp = await fetch("/api/chat", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ messages, max_tokens: Number(maxEl.value),
                               ...(tempEl.dataset.touched ? { temperature: Number(tempEl.value) } : {}) }),
        signal: controller.signal,
      });
      if (!resp.ok || !(resp.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
        let msg = `HTTP ${resp.status}`;
        try { msg = (await resp.json()).error.message || msg; } catch (_) { /* not JSON */ }
        throw new Error(msg);
      }
      await readEvents(resp, (data) => {
        if (data === "[DONE]") return false;
        const obj = JSON.parse(data);
        if (obj.error) { error = obj.error.message; return false; }
        if (obj.usage) usage = obj.usage;
        const choice = obj.choices && obj.choices[0];
        if (!choice) return true;
        if (choice.delta && choice.delta.content) {
          if (firstAt === null) firstAt = performance.now();
          textEl.textContent += choice.delta.content;
          messagesEl.scrollTop = messagesEl.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        return true;
      });
      if (error) throw new Error(error);
      el.dataset.state = "done";
      const secs = (performance.now() - started) / 1000;
      const n = usage ? usage.completion_tokens : null;
      const parts = [];
      if (n !== null) parts.push(`${n} tokens`);
      if (firstAt !== null) parts.push(`first token ${((firstAt - started) / 1000).toFixed(2)} s`);
      if (n && firstAt !== null && n > 1) parts.push(`${((n - 1) / ((performance.now() - firstAt) / 1000)).toFixed(1)} tokens/s`);
      if (finish === "length") parts.push("stopped at max tokens");
      setMeta(el, parts.join(" · ") || `${secs.toFixed(1)} s`);
    } catch (e) {
      if (e.name === "AbortError") {
        el.dataset.state = "stopped";
        setMeta(el, "stopped");
      } else {
        el.dataset.state = "error";
        setMeta(el, "error: " + e.message);
      }
    } finally {
      controller = null;
      setBusy(false);
      const reply = textEl.textContent;
      if (el.dataset.state !== "error") history.push(user, { role: "assistant", content: reply });
      document.dispatchEvent(new CustomEvent("reply-finished"));
    }
  }

  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = promptEl.value.trim();
    if (!text || controller) return;
    promptEl.value = "";
    send(text);
  });
  promptEl.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    messagesEl.innerHTML = '<p id="empty" class="hint">New conversation.</p>';
  });
  setBusy(false);
})();
