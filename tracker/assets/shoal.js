// shoal dashboards: shared helpers. The bearer token, when the server wants one, is given in
// the page's fragment (#token=...), which browsers never send to the server.
"use strict";
const shoal = (() => {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) { sessionStorage.setItem("shoal-token", decodeURIComponent(m[1])); }
  const token = sessionStorage.getItem("shoal-token");
  async function api(path) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch(path, { headers, cache: "no-store" });
    if (!r.ok) {
      let why = r.status + " " + r.statusText;
      try { why = (await r.json()).error || why; } catch (_) { /* not JSON */ }
      throw new Error(why);
    }
    return r.json();
  }
  function bytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + u[i];
  }
  function el(tag, attrs, ...kids) {
    const svg = ["svg", "line", "circle", "text", "path", "g", "polyline", "marker", "defs", "rect"].includes(tag);
    const e = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) { e.setAttribute(k, v); }
    for (const k of kids) { e.append(k); }
    return e;
  }
  // Poll `fn` every `ms`, showing errors in #error.
  function poll(fn, ms) {
    const tick = async () => {
      const err = document.getElementById("error");
      try { await fn(); err.textContent = ""; } catch (e) { err.textContent = "cannot refresh: " + e.message; }
      setTimeout(tick, ms);
    };
    tick();
  }
  return { api, bytes, el, poll };
})();
