// verbatim report: filtering and sorting the interview table, and the transcript player.
// Plain DOM code, no library; everything reads data- attributes the server wrote (escaped).
"use strict";
(function () {
  // -- dashboard: filter by status, language and free text; sort by any column --------------
  const table = document.getElementById("interview-table");
  if (table) {
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const status = document.getElementById("filter-status");
    const language = document.getElementById("filter-language");
    const text = document.getElementById("filter-text");
    const count = document.getElementById("filter-count");
    const apply = function () {
      const st = status.value, lang = language.value, q = text.value.trim().toLowerCase();
      let shown = 0;
      for (const row of rows) {
        const ok = (!st || row.dataset.statuses.split(" ").includes(st)) &&
          (!lang || row.dataset.language === lang) && (!q || row.dataset.search.includes(q));
        row.hidden = !ok;
        if (ok) shown += 1;
      }
      count.textContent = String(shown);
    };
    // The filters live in the URL hash (#status=failed), so a filtered view can be linked to.
    const params = new URLSearchParams(location.hash.slice(1));
    status.value = params.get("status") || "";
    language.value = params.get("language") || "";
    text.value = params.get("q") || "";
    const remember = function () {
      const p = new URLSearchParams();
      if (status.value) p.set("status", status.value);
      if (language.value) p.set("language", language.value);
      if (text.value) p.set("q", text.value);
      history.replaceState(null, "", p.toString() ? "#" + p : location.pathname);
      apply();
    };
    document.getElementById("filters").addEventListener("submit", function (event) { event.preventDefault(); });
    status.addEventListener("change", remember);
    language.addEventListener("change", remember);
    text.addEventListener("input", remember);
    apply();
    table.tHead.addEventListener("click", function (event) {
      const th = event.target.closest("th[data-sort]");
      if (!th) return;
      const index = th.cellIndex, numeric = th.dataset.sort === "num";
      const ascending = th.getAttribute("aria-sort") !== "ascending";
      for (const other of table.tHead.rows[0].cells) other.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      const key = function (row) {
        const value = row.cells[index].dataset.value || "";
        return numeric ? parseFloat(value) || 0 : value;
      };
      rows.sort(function (a, b) {
        const x = key(a), y = key(b);
        const order = numeric ? x - y : x.localeCompare(y);
        return ascending ? order : -order;
      });
      for (const row of rows) body.appendChild(row);
    });
  }

  // -- interview page: a cue seeks the player; the playing cue is highlighted -------------------
  const player = document.getElementById("player");
  const cueTable = document.getElementById("cues");
  if (player && cueTable) {
    const cues = Array.from(cueTable.querySelectorAll("tr.cue[data-start]"));
    const starts = cues.map(function (row) { return parseFloat(row.dataset.start); });
    const seek = function (row) {
      player.currentTime = parseFloat(row.dataset.start);
      const playing = player.play();
      if (playing) playing.catch(function () { /* no audio device or autoplay refused: the seek stands */ });
    };
    cueTable.addEventListener("click", function (event) {
      const row = event.target.closest("tr.cue[data-start]");
      if (row) seek(row);
    });
    cueTable.addEventListener("keydown", function (event) {
      const row = event.target.closest("tr.cue[data-start]");
      if (row && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); seek(row); }
    });
    let current = null;
    const highlight = function () {
      const t = player.currentTime;
      let lo = 0, hi = starts.length - 1, found = -1;
      while (lo <= hi) {  // the last cue starting at or before t
        const mid = (lo + hi) >> 1;
        if (starts[mid] <= t) { found = mid; lo = mid + 1; } else { hi = mid - 1; }
      }
      let row = found >= 0 ? cues[found] : null;
      if (row && row.dataset.end && t >= parseFloat(row.dataset.end)) row = null;  // in a pause between cues
      if (row === current) return;
      if (current) current.classList.remove("current");
      current = row;
      if (row) {
        row.classList.add("current");
        if (!player.paused) row.scrollIntoView({ block: "nearest", behavior: "smooth" });
      }
    };
    player.addEventListener("timeupdate", highlight);
    player.addEventListener("seeked", highlight);
    const switcher = document.getElementById("lang-switch");
    if (switcher) {
      const show = function () {
        for (const cell of cueTable.querySelectorAll(".tr-col")) {
          cell.classList.toggle("narrow-off", cell.dataset.lang !== switcher.value);
        }
      };
      switcher.addEventListener("change", show);
      show();
    }
  }
})();
