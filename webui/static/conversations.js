// Conversations kept in the browser (localStorage), so a reload or a closed tab loses
// nothing: a list of {id, title, updated, messages: [{role, content}]}, the newest first,
// and the id of the one on screen. Nothing leaves the browser but the messages of a request.
"use strict";

window.Conversations = (function () {
  const KEY = "tpi.conversations", CURRENT = "tpi.current", MAX = 50;

  function load() {
    try {
      const list = JSON.parse(localStorage.getItem(KEY) || "[]");
      return Array.isArray(list) ? list.filter((c) => c && Array.isArray(c.messages)) : [];
    } catch (_) {
      return [];                               // unreadable storage: start afresh
    }
  }

  function save(list) {
    try { localStorage.setItem(KEY, JSON.stringify(list.slice(0, MAX))); } catch (_) { /* full or disabled */ }
  }

  return {
    all: load,
    current() {
      const id = localStorage.getItem(CURRENT);
      return load().find((c) => c.id === id) || null;
    },
    select(id) { localStorage.setItem(CURRENT, id); },
    create() {
      const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat",
                  updated: Date.now(), messages: [] };
      save([c, ...load()]);
      this.select(c.id);
      return c;
    },
    update(c) {                                // store c (its messages changed), newest first
      if (c.title === "New chat") {
        const first = c.messages.find((m) => m.role === "user");
        if (first) c.title = first.content.slice(0, 40);
      }
      c.updated = Date.now();
      save([c, ...load().filter((x) => x.id !== c.id)]);
    },
    remove(id) { save(load().filter((c) => c.id !== id)); },
  };
})();
