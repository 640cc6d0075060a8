// Markdown from the model -> DOM nodes, built only with createElement and text nodes: the
// model's text never becomes HTML (a "<script>" in a reply is shown as those characters).
// Understood: ``` fenced code blocks (also an unclosed one while a reply streams), `inline
// code`, **bold**, *italic* / _italic_, # headings, - / * / + and 1. lists, paragraphs.
"use strict";

(function () {
  const LIST = /^\s*([-*+]|\d+[.)])\s+(.*)$/;
  const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const INLINE = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\s][^*\n]*\*|_[^_\s][^_\n]*_)/g;

  function node(tag, cls) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    return e;
  }

  function inline(text, parent) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      parent.append(text.slice(last, m.index));
      const t = m[0];
      let e;
      if (t[0] === "`") { e = node("code"); e.textContent = t.slice(1, -1); }
      else if (t.startsWith("**")) { e = node("strong"); e.textContent = t.slice(2, -2); }
      else { e = node("em"); e.textContent = t.slice(1, -1); }
      parent.append(e);
      last = m.index + t.length;
    }
    parent.append(text.slice(last));
  }

  const startsBlock = (line) => FENCE.test(line) || HEADING.test(line) || LIST.test(line);

  window.renderMarkdown = function renderMarkdown(text, container) {
    container.replaceChildren();
    const lines = text.split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(FENCE);
      if (fence) {
        const code = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
        i++;                                   // the closing fence (absent while still streaming)
        const pre = node("pre"), c = node("code");
        if (fence[1]) c.dataset.lang = fence[1];
        c.textContent = code.join("\n");
        pre.append(c);
        container.append(pre);
        continue;
      }
      const h = line.match(HEADING);
      if (h) {
        const e = node("h" + Math.min(6, h[1].length + 2));
        inline(h[2], e);
        container.append(e);
        i++;
        continue;
      }
      const item = line.match(LIST);
      if (item) {
        const ordered = /\d/.test(item[1]);
        const list = node(ordered ? "ol" : "ul");
        let m;
        while (i < lines.length && (m = lines[i].match(LIST)) && /\d/.test(m[1]) === ordered) {
          const li = node("li");
          inline(m[2], li);
          list.append(li);
          i++;
        }
        container.append(list);
        continue;
      }
      if (!line.trim()) { i++; continue; }
      const para = [];
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) para.push(lines[i++]);
      const p = node("p");
      inline(para.join("\n"), p);
      container.append(p);
    }
  };
})();
