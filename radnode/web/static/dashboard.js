// Minimal partial refresh (the one htmx-like behaviour the dashboard needs, without a build
// step or CDN): an element with data-refresh="URL" data-every="SECONDS" is re-filled with the
// HTML fragment at URL every SECONDS while the tab is visible.
(function () {
  "use strict";
  function refresh(el) {
    if (document.hidden) { return; }
    fetch(el.dataset.refresh, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { el.innerHTML = html; })
      .catch(function () { /* keep the last good view; the next tick tries again */ });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(function (el) {
      var every = Math.max(2, parseInt(el.dataset.every || "10", 10)) * 1000;
      setInterval(function () { refresh(el); }, every);
    });
  });
})();
