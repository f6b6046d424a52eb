// pacs-node dashboard: refresh the page's content in place, post actions to the JSON API,
// run the rule tester. Plain JavaScript, no build step; the pages work without it, only staler.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var period = parseFloat(document.body.getAttribute("data-refresh") || "0");
  var busy = false;

  function toast(text, bad) {
    var box = document.getElementById("toast");
    var div = document.createElement("div");
    div.textContent = text;
    if (bad) div.className = "bad";
    box.appendChild(div);
    setTimeout(function () { div.remove(); }, bad ? 8000 : 4000);
  }

  function partialUrl() {
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    return url.toString();
  }

  function editing() {
    var el = document.activeElement;
    return el && live.contains(el) && (el.tagName === "INPUT" || el.tagName === "SELECT" || el.tagName === "TEXTAREA");
  }

  function refresh() {
    if (busy || document.visibilityState !== "visible" || editing()) return Promise.resolve();
    busy = true;
    return fetch(partialUrl(), { credentials: "same-origin", headers: { "X-Requested-With": "pacs-node" } })
      .then(function (r) {
        if (r.redirected || r.status === 401) { window.location.reload(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) return;
        var open = Array.prototype.map.call(live.querySelectorAll("details[id][open]"), function (d) { return d.id; });
        live.innerHTML = html;
        open.forEach(function (id) { var d = document.getElementById(id); if (d) d.open = true; });
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () { /* the node is restarting: try again next time */ })
      .then(function () { busy = false; });
  }

  if (period > 0) setInterval(refresh, period * 1000);

  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest("button[data-post]");
    if (!btn) return;
    ev.preventDefault();
    var ask = btn.getAttribute("data-confirm");
    if (ask && !window.confirm(ask)) return;
    btn.disabled = true;
    fetch(btn.getAttribute("data-post"), {
      method: "POST", credentials: "same-origin", headers: { "Accept": "application/json" }
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (body) {
        if (r.ok) toast(btn.getAttribute("data-done") || "Done");
        else toast((body && body.error) || ("The node answered " + r.status), true);
      });
    }).catch(function (e) { toast("The node did not answer: " + e, true); })
      .then(function () { btn.disabled = false; busy = false; return refresh(); });
  });

  var tester = document.getElementById("rule-tester");
  if (tester) {
    tester.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var files = tester.querySelector("input[type=file]").files;
      var out = document.getElementById("rule-results");
      out.innerHTML = "";
      if (!files.length) { toast("Choose one or more DICOM files first.", true); return; }
      var params = new URLSearchParams();
      ["calling_ae", "called_ae"].forEach(function (k) {
        var v = tester.querySelector("[name=" + k + "]").value.trim();
        if (v) params.set(k, v);
      });
      Array.prototype.reduce.call(files, function (chain, file) {
        return chain.then(function () {
          var p = new URLSearchParams(params);
          p.set("name", file.name);
          return fetch(tester.getAttribute("data-action") + "?" + p.toString(), {
            method: "POST", credentials: "same-origin", body: file,
            headers: { "Content-Type": "application/octet-stream" }
          }).then(function (r) { return r.text().then(function (t) { return [r, t]; }); })
            .then(function (rt) {
              var div = document.createElement("div");
              if (rt[0].ok) div.innerHTML = rt[1];
              else div.textContent = file.name + ": the node answered " + rt[0].status;
              out.appendChild(div);
            });
        });
      }, Promise.resolve());
    });
  }
})();
