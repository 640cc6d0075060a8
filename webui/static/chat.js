// The chat: multi-turn conversations kept in the browser (conversations.js), replies streamed
// from /api/chat (server-sent events relayed from the master) and rendered as markdown
// (markdown.js, no HTML from the model), a stop button that aborts the stream.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const messagesEl = $("messages"), promptEl = $("prompt"), sendBtn = $("send"), stopBtn = $("stop");
  const tempEl = $("temperature"), tempOut = $("temperature-value"), maxEl = $("max-tokens"), systemEl = $("system");

  const listEl = $("conversations");
  let conv = Conversations.current() || Conversations.create();   // {messages: [{role, content}] of finished turns}
  let controller = null;       // AbortController of the reply in flight

  // The slider starts at the model's default (rendered by the server); until it is moved,
  // requests leave temperature out and the master applies the model's own settings.
  tempEl.addEventListener("input", () => { tempOut.textContent = tempEl.value; tempEl.dataset.touched = "1"; });

  function bubble(role, text) {
    $("empty")?.remove();
    const el = document.createElement("div");
    el.className = "msg " + role;
    const body = document.createElement(role === "assistant" ? "div" : "span");
    body.className = "text";
    if (role === "assistant") renderMarkdown(text, body);
    else body.textContent = text;
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
    messages.push(...conv.messages, user);
    const started = performance.now();
    let firstAt = null, finish = null, usage = null, error = null, raw = "", drawing = false;
    const draw = () => { drawing = false; renderMarkdown(raw, textEl); messagesEl.scrollTop = messagesEl.scrollHeight; };
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
          raw += choice.delta.content;
          if (!drawing) { drawing = true; requestAnimationFrame(draw); }  // at most once a frame
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
      renderMarkdown(raw, textEl);
      setBusy(false);
      if (el.dataset.state !== "error") {
        conv.messages.push(user, { role: "assistant", content: raw });
        Conversations.update(conv);
        showList();
      }
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
  function show(c) {           // put conversation c on screen
    conv = c;
    Conversations.select(c.id);
    messagesEl.replaceChildren();
    const hint = document.createElement("p");
    hint.id = "empty";
    hint.className = "hint";
    hint.textContent = "Ask something. Replies stream token by token from the device cluster.";
    messagesEl.append(hint);
    for (const m of c.messages) bubble(m.role, m.content).dataset.state = "done";
    showList();
  }

  function showList() {
    listEl.replaceChildren();
    for (const c of Conversations.all()) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = c.title;
      b.title = new Date(c.updated).toLocaleString();
      if (c.id === conv.id) li.className = "current";
      b.addEventListener("click", () => { if (!controller) show(Conversations.all().find((x) => x.id === c.id) || c); });
      li.append(b);
      listEl.append(li);
    }
  }

  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    show(conv.messages.length ? Conversations.create() : conv);
  });
  show(conv);
  setBusy(false);
})();
