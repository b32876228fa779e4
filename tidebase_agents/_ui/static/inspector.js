// Self-refresh for pages the server marks live (data-refresh on #live): every few seconds,
// fetch the same URL and swap in its #live region, keeping <details> the reader opened or
// closed as they were. Parsed markup is inert (DOMParser runs no scripts).
"use strict";
(function () {
  function schedule() {
    const live = document.getElementById("live");
    if (!live || !live.dataset.refresh) return;
    setTimeout(refresh, (Number(live.dataset.refresh) || 5) * 1000);
  }

  async function refresh() {
    const current = document.getElementById("live");
    try {
      const response = await fetch(location.href, { credentials: "same-origin" });
      if (response.ok) {
        const doc = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = doc.getElementById("live");
        if (fresh && current) {
          const before = new Map();
          current.querySelectorAll("details[id]").forEach((d) => before.set(d.id, d.open));
          fresh.querySelectorAll("details[id]").forEach((d) => {
            if (before.has(d.id)) d.open = before.get(d.id);
          });
          current.replaceWith(document.adoptNode(fresh));
        }
      }
    } catch (err) {
      // The server is restarting or unreachable: try again on the next tick.
    }
    schedule();
  }

  schedule();
})();
