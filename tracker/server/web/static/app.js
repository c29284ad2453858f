// tracker's page. "/" lists tracks by state with live bars; "/jobs/<jid>" shows one job and
// its history as a timeline. Live through Server-Sent Events read with fetch (so a token,
// when the server needs one for reads, goes in a header and never in a URL). No libraries.
"use strict";

const STATES = ["working", "enqueued", "failed", "success", "dead"];
const TERMINAL = new Set(["success", "dead"]);
const PAGE = 50;
const $ = (tag, cls, text) => {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  if (text !== undefined) el.textContent = text;
  return el;
};

// ------------------------------------------------------------------ token, fetch
function token() { return sessionStorage.getItem("tracker-token"); }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}
function askToken() {
  const form = document.getElementById("token");
  form.hidden = false;
  form.onsubmit = (e) => {
    e.preventDefault();
    sessionStorage.setItem("tracker-token", document.getElementById("token-input").value.trim());
    location.reload();
  };
}
async function api(path) {
  const r = await fetch(path, { headers: headers(), cache: "no-store" });
  if (r.status === 401) { askToken(); throw new Error("token needed"); }
  return r;
}
function setLive(state, text) {
  const el = document.getElementById("live");
  el.dataset.state = state;
  el.textContent = text;
}

// ------------------------------------------------------------------ SSE over fetch
// onEvent(type, data) returning false ends the stream for good. Reconnects with
// Last-Event-ID after the server's retry delay; a 204 means there is nothing more.
function sse(url, onEvent, onEnd) {
  let lastId = null, delay = 2000, stopped = false, ctl = null;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  (async () => {
    while (!stopped) {
      ctl = new AbortController();
      try {
        const h = headers({ Accept: "text/event-stream" });
        if (lastId) h["Last-Event-ID"] = lastId;
        const r = await fetch(url, { headers: h, signal: ctl.signal, cache: "no-store" });
        if (r.status === 204) { stopped = true; if (onEnd) onEnd(); return; }
        if (r.status === 401) { askToken(); return; }
        if (!r.ok) throw new Error("HTTP " + r.status);
        setLive("live", "live");
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value.replace(/\r\n?/g, "\n");
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let type = "message", id = null;
            const data = [];
            for (const line of block.split("\n")) {
              const i = line.indexOf(":");
              if (i === 0) continue; // a comment (keepalive)
              const k = i < 0 ? line : line.slice(0, i);
              const v = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (k === "data") data.push(v);
              else if (k === "id") id = v;
              else if (k === "event") type = v;
              else if (k === "retry" && /^\d+$/.test(v)) delay = +v;
            }
            if (id !== null) lastId = id;
            if (data.length && onEvent(type, data.join("\n")) === false) {
              stopped = true; ctl.abort(); if (onEnd) onEnd(); return;
            }
          }
        }
      } catch (e) {
        if (stopped) return;
      }
      setLive("down", "reconnecting…");
      await sleep(delay);
    }
  })();
  return { stop() { stopped = true; if (ctl) ctl.abort(); } };
}

// ------------------------------------------------------------------ one track's row
function when(track) {
  return track.updated_at ? track.updated_at.replace("T", " ").replace("Z", " UTC") : "";
}
function fill(el, track) {
  const pct = typeof track.percent === "number" ? track.percent : null;
  el.dataset.state = track.state;
  el.dataset.percent = pct === null ? "" : String(pct);
  const bar = el.querySelector(".bar");
  bar.setAttribute("aria-valuenow", pct === null ? "0" : String(pct));
  bar.firstChild.style.width = (pct === null ? (TERMINAL.has(track.state) ? 100 : 0) : pct) + "%";
  el.querySelector(".pct").textContent = pct === null ? "" : pct + "%";
  el.querySelector(".desc").textContent = track.desc || "";
  el.querySelector(".when").textContent = when(track);
  const badge = el.querySelector(".badge");
  if (badge) { badge.dataset.state = track.state; badge.textContent = track.state; }
}
function skeleton(el, head) {
  const bar = $("div", "bar");
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  bar.appendChild($("span"));
  el.append(head, $("span", "pct"), bar, $("span", "desc"), $("span", "when"));
  return el;
}
function row(track) {
  const li = $("li", "row");
  li.dataset.jid = track.jid;
  const a = $("a", "jid", track.jid);
  a.href = "/jobs/" + encodeURIComponent(track.jid);
  skeleton(li, a);
  fill(li, track);
  return li;
}

// ------------------------------------------------------------------ "/": by state
function listPage(main) {
  const sections = {}, rows = new Map();
  const tabs = $("nav", "tabs");
  const note = $("p", "note");
  main.append(tabs, note);
  for (const s of STATES) {
    const sec = $("section", "state");
    sec.id = s;
    sec.dataset.state = s;
    const h = $("h2", null, s + " ");
    const count = $("span", "count", "0");
    h.appendChild(count);
    const ul = $("ul", "rows");
    const empty = $("li", "empty", "none");
    ul.appendChild(empty);
    sec.append(h, ul);
    main.appendChild(sec);
    const tab = $("a", null, s);
    tab.href = "#" + s;
    const tabCount = $("b", null, "0");
    tab.appendChild(tabCount);
    tabs.appendChild(tab);
    sections[s] = { ul, count, tabCount, empty };
  }
  const recount = () => {
    for (const s of STATES) {
      const n = sections[s].ul.querySelectorAll("li.row").length;
      sections[s].count.textContent = String(n);
      sections[s].tabCount.textContent = String(n);
      sections[s].empty.hidden = n > 0;
    }
  };
  const upsert = (track, fresh) => {
    let el = rows.get(track.jid);
    if (track.state === "unknown" || !sections[track.state]) {
      if (el) { el.remove(); rows.delete(track.jid); recount(); }
      return;
    }
    const target = sections[track.state].ul;
    if (!el) { el = row(track); rows.set(track.jid, el); }
    else fill(el, track);
    if (el.parentNode !== target) {
      if (fresh) target.insertBefore(el, sections[track.state].empty.nextSibling);
      else target.appendChild(el);
    } else if (fresh && target.children[1] !== el) {
      target.insertBefore(el, sections[track.state].empty.nextSibling); // newest first
    }
    recount();
  };
  const load = async () => {
    let missing = false;
    await Promise.all(STATES.map(async (s) => {
      try {
        const r = await api("/v1/jobs?state=" + s + "&limit=" + PAGE);
        if (r.status === 501) { missing = true; return; }
        if (!r.ok) return;
        const page = await r.json();
        for (const t of page.tracks) upsert(t, false);
      } catch (e) { /* token asked, or offline: the stream reconnects */ }
    }));
    note.textContent = missing
      ? "This server cannot list tracks by state yet; jobs appear here as they change."
      : "Newest update first; live.";
    recount();
  };
  load();
  sse("/v1/events", (type, data) => {
    if (type === "resync") { load(); return; }
    upsert(JSON.parse(data), true);
  });
}

// ------------------------------------------------------------------ "/jobs/<jid>"
function jobPage(main, jid) {
  main.classList.add("job");
  const h1 = $("h1", null, jid);
  const card = skeleton($("div", "card"), $("span", "badge", "…"));
  card.dataset.jid = jid;
  const back = $("a", "note", "← all jobs");
  back.href = "/";
  const tl = $("ol", "timeline");
  main.append(back, h1, card, tl);
  let pending = null;
  const history = async () => {
    try {
      const r = await api("/v1/tracks/" + encodeURIComponent(jid) + "/history");
      if (!r.ok) return;
      const items = await r.json();
      tl.replaceChildren(...items.map((e) => {
        const li = $("li");
        li.dataset.event = e.event;
        li.append($("time", null, e.time.replace("T", " ").replace("Z", " UTC")), $("b", null, e.event));
        const f = Object.entries(e.fields || {}).map(([k, v]) => k + "=" + v).join(" ");
        li.appendChild($("span", "fields", f));
        return li;
      }));
      if (!items.length) tl.replaceChildren($("li", "empty", "no history (unknown, untracked, or past retention)"));
    } catch (e) { /* token asked */ }
  };
  history();
  sse("/v1/tracks/" + encodeURIComponent(jid) + "/events", (type, data) => {
    const track = JSON.parse(data);
    fill(card, track);
    clearTimeout(pending);
    pending = setTimeout(history, 100);
    if (TERMINAL.has(track.state)) { setLive("live", "finished"); return false; }
  }, () => setLive("live", "finished"));
}

// ------------------------------------------------------------------ start
(function start() {
  const main = document.getElementById("main");
  const m = location.pathname.match(/^\/jobs\/(.+)$/);
  if (m) jobPage(main, decodeURIComponent(m[1]));
  else listPage(main);
})();
