// The dataset review page: one candidate at a time, the next ones already fetched with their images
// preloaded, so a decision swaps the picture at once while its POST goes in the background (as on
// the vote page). Every candidate the page holds, or whose decision is still in flight, is sent as
// `exclude`, so the server never hands the same candidate twice.
// A: accept, R: reject, E: edit the caption (Ctrl/Cmd+Enter accepts with it, Esc stops editing),
// U: undo the last decision still within the server's window (data-undo-ms): the candidate goes back
// to the queue as it was and comes back on screen, to decide again.
// The caption goes with the decision only when it was changed. A candidate takes input only once it
// has been on screen for SETTLE_MS, so a double tap never decides the one that replaced it.
// A refused decision (the image is already in a built dataset version, or someone decided it first)
// is not passed over: the page says which candidate and why (#lost keeps the list), and when the
// session has ended it takes no more decisions, which could only be lost too.
// "Candidates waiting" is the server's count from each reply (the newest review event wins).
// With ?view=dropped (data-view) the page goes through what the automatic checks dropped, each with
// its reason: a decision there overrides the drop (`override_drop` in the POST), and undoing it
// drops the candidate again, with its reason.
(function () {
  "use strict";
  var SETTLE_MS = 300;
  var LOW_WATER = 3;  // fetch more once this few are left ahead
  var root = document.getElementById("dataset");
  if (!root) return;
  var slug = root.dataset.slug;
  var view = root.dataset.view === "dropped" ? "dropped" : "pending";
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var card = document.getElementById("ds-card");
  var image = document.getElementById("ds-img");
  var idEl = document.getElementById("ds-id");
  var identityEl = document.getElementById("ds-identity");
  var reasonRow = document.getElementById("ds-reason-row");
  var reasonEl = document.getElementById("ds-reason");
  var originEl = document.getElementById("ds-origin");
  var nearestBox = document.getElementById("ds-nearest");
  var nearestImg = document.getElementById("ds-nearest-img");
  var nearestText = document.getElementById("ds-nearest-text");
  var form = document.getElementById("ds-form");
  var caption = document.getElementById("ds-caption");
  var editButton = document.getElementById("ds-edit");
  var statusLine = document.getElementById("status");
  var remainingEl = document.getElementById("remaining");
  var doneBox = document.getElementById("done");
  var lostList = document.getElementById("lost");
  var undoButtons = root.querySelectorAll("[data-action='undo']");
  var undoMs = parseInt(root.dataset.undoMs, 10) || 300000;

  var current = null;        // the candidate on screen
  var upcoming = [];         // candidates to show next, first first
  var fetching = null;       // promise of the fetch filling `upcoming`
  var exhausted = false;     // the last fetch found nothing more
  var held = new Set();      // candidate ids on the page or with a decision in flight
  var inflight = new Set();  // decision POST promises
  var decided = 0;
  var asOf = -1;
  var acceptAt = Infinity;
  var stopped = false;
  var history = [];          // decisions that may be undone, newest last: {item, kind, at, result}
  var undoing = false, undoTimer = null;

  function setStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("is-error", !!isError);
  }

  function readJson(resp) {
    return resp.json().catch(function () { return {}; }).then(function (data) {
      if (!resp.ok) {
        var err = new Error(data.error || resp.statusText);
        err.status = resp.status;
        throw err;
      }
      return data;
    });
  }

  function sessionGone(err) { return err.status === 401 || err.status === 403; }

  function explain(err) {
    if (err.status === 401) return "your session has ended: log in again (reload the page).";
    if (err.status === 403) return "the server no longer takes decisions from this page (" + err.message + "): reload it.";
    return "refused (" + err.status + "): " + err.message;
  }

  function stop() {
    stopped = true;
    root.dataset.stopped = "1";
    root.querySelectorAll("[data-action]").forEach(function (button) { button.disabled = true; });
  }

  function report(err) {
    setStatus("Could not load the queue: " + explain(err), true);
    if (sessionGone(err)) stop();
  }

  function applyCounts(data) {
    if (!data || typeof data.remaining !== "number" || data.as_of < asOf) return;
    asOf = data.as_of;
    remainingEl.textContent = view === "dropped" ? data.dropped + " dropped by the checks."
      : data.remaining + " candidate" + (data.remaining === 1 ? "" : "s") + " waiting.";
    root.dataset.remaining = String(view === "dropped" ? data.dropped : data.remaining);
    root.querySelectorAll("[data-count]").forEach(function (el) {
      if (typeof data[el.dataset.count] === "number") el.textContent = String(data[el.dataset.count]);
    });
  }

  function preload(item) {
    var urls = [item.url, item.nearest && item.nearest.url].filter(Boolean);
    item.images = urls.map(function (url) { var i = new Image(); i.src = url; return i; });
    return item;
  }

  function fetchMore() {
    if (fetching) return fetching;
    var query = "?view=" + view + (held.size ? "&exclude=" + Array.from(held).join(",") : "");
    fetching = fetch("/api/dataset/" + encodeURIComponent(slug) + "/queue" + query, {
      headers: { "Accept": "application/json" }, credentials: "same-origin", cache: "no-store"
    }).then(readJson).then(function (data) {
      applyCounts(data);
      var fresh = data.items.filter(function (item) { return !held.has(item.id); });
      exhausted = !fresh.length;
      fresh.forEach(function (item) { held.add(item.id); upcoming.push(preload(item)); });
    }).catch(report).then(function () { fetching = null; });
    return fetching;
  }

  function setEditing(on) {
    caption.readOnly = !on;
    root.dataset.editing = on ? "1" : "0";
    editButton.classList.toggle("is-on", on);
    if (on) { caption.focus(); caption.setSelectionRange(caption.value.length, caption.value.length); }
  }

  function show(item) {
    current = item;
    acceptAt = performance.now() + SETTLE_MS;
    root.dataset.inputReady = "0";
    setTimeout(function () { if (current === item) root.dataset.inputReady = "1"; }, SETTLE_MS);
    card.hidden = false;
    doneBox.hidden = true;
    root.dataset.done = "0";
    root.dataset.candidateId = String(item.id);
    image.src = item.url || "data:,";
    idEl.textContent = item.id;
    identityEl.textContent = item.identity_text;
    reasonRow.hidden = item.status !== "dropped";
    reasonEl.textContent = item.status === "dropped" ? (item.reason || "dropped") : "";
    originEl.textContent = "";
    if (item.origin.link) {
      var link = document.createElement("a");
      link.href = item.origin.link;
      link.textContent = item.origin.text;
      originEl.appendChild(link);
    } else originEl.textContent = item.origin.text;
    nearestBox.hidden = !item.nearest;
    if (item.nearest) {
      nearestImg.src = item.nearest.url || "data:,";
      nearestImg.hidden = !item.nearest.url;
      nearestText.textContent = item.nearest.text;
    }
    form.action = "/dataset/candidates/" + item.id + "/decide";
    caption.value = item.caption;
    setEditing(false);
  }

  function refreshUndo() {
    clearTimeout(undoTimer);
    var now = Date.now();
    while (history.length && now - history[0].at > undoMs) history.shift();
    var last = history[history.length - 1];
    undoButtons.forEach(function (button) { button.disabled = stopped || undoing || !last; });
    root.dataset.undoable = last ? last.kind : "";
    if (last) undoTimer = setTimeout(refreshUndo, Math.max(50, history[0].at + undoMs - now + 10));
  }

  // Take back the newest decision still in the window, once it has landed; the candidate comes back
  // on screen (the one that was there goes back to the front of the line).
  function undo() {
    if (stopped || undoing) return;
    refreshUndo();
    var entry = history.pop();
    if (!entry) return;
    undoing = true;
    refreshUndo();
    root.dataset.countsSettled = "0";
    entry.result.then(function (data) {
      if (!data) throw Object.assign(new Error("it was never recorded, so there is nothing to undo"), { status: 0 });
      return fetch("/api/dataset/candidates/" + entry.item.id + "/undo", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrf },
        body: "{}"
      }).then(readJson);
    }).then(function (data) {
      applyCounts(data);
      decided -= 1;
      root.dataset.decided = String(decided);
      root.dataset.undone = String((parseInt(root.dataset.undone || "0", 10)) + 1);
      var again = preload(data.candidate);
      held.add(again.id);
      if (current) upcoming.unshift(current);
      show(again);
      setStatus("Your " + (entry.kind === "accept" ? "acceptance" : "rejection") + " of #" + again.id + " is undone" +
                (again.status === "dropped" ? " (dropped again: " + (again.reason || "dropped") + ")" : "") + ": decide again.", false);
    }).catch(function (err) {
      if (err.status === 0) setStatus("Nothing to undo: " + err.message, true);
      else { setStatus("The undo was refused: " + explain(err), true); if (sessionGone(err)) stop(); }
    }).then(function () {
      undoing = false;
      refreshUndo();
      if (!inflight.size) root.dataset.countsSettled = "1";
    });
  }

  function finish() {
    current = null;
    delete root.dataset.candidateId;
    card.hidden = true;
    doneBox.hidden = false;
    root.dataset.done = "1";
  }

  function advance() {
    current = null;
    if (upcoming.length) {
      show(upcoming.shift());
      if (upcoming.length < LOW_WATER && !exhausted) fetchMore();
      return;
    }
    card.classList.add("busy");
    // Nothing ahead: let the decisions land, then ask the server once more.
    Promise.allSettled(Array.from(inflight)).then(fetchMore).then(function () {
      card.classList.remove("busy");
      if (current) return;
      if (upcoming.length) show(upcoming.shift()); else finish();
    });
  }

  function lose(item, what, err) {
    var text = "The " + what + " of #" + item.id + " was not recorded: " + explain(err);
    setStatus(text, true);
    var entry = document.createElement("li");
    entry.textContent = text;
    lostList.appendChild(entry);
    lostList.hidden = false;
    root.dataset.lost = String(lostList.children.length);
    if (sessionGone(err)) stop(); else fetchMore();  // the count as it stands now (someone else decided)
  }

  function decide(kind) {
    if (!current || stopped || performance.now() < acceptAt) return;
    var item = current;
    var body = { decision: kind };
    var typed = caption.value.trim().replace(/\s+/g, " ");
    if (typed && typed !== item.caption) body.caption = typed;
    if (view === "dropped") body.override_drop = true;
    root.dataset.countsSettled = "0";
    var request = fetch("/api/dataset/candidates/" + item.id + "/decide", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body)
    }).then(readJson).then(function (data) {
      decided += 1;
      root.dataset.decided = String(decided);
      setStatus((kind === "accept" ? "Accepted #" : "Rejected #") + item.id + (body.override_drop ? " over the drop" : "") +
                (body.caption ? " with your caption." : "."), false);
      applyCounts(data);
      return data;
    }, function (err) {
      lose(item, kind === "accept" ? "acceptance" : "rejection", err);
      history = history.filter(function (entry) { return entry.result !== request; });  // nothing to undo there
      refreshUndo();
      return null;
    }).then(function (data) {
      held.delete(item.id);
      inflight.delete(request);
      // Settled: no decision in flight and no queue fetch (a refusal asks for the count again).
      if (!inflight.size) (fetching || Promise.resolve()).then(function () {
        if (!inflight.size && !fetching) root.dataset.countsSettled = "1";
      });
      return data;
    });
    inflight.add(request);
    history.push({ item: item, kind: kind, at: Date.now(), result: request });
    if (history.length > 20) history.shift();
    refreshUndo();
    advance();
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();  // the page decides through the API; the form is for a browser without JavaScript
    var button = event.submitter;
    if (button && button.dataset.action) decide(button.dataset.action);
  });
  editButton.addEventListener("click", function () { setEditing(caption.readOnly); });
  undoButtons.forEach(function (button) { button.addEventListener("click", undo); });
  caption.addEventListener("keydown", function (event) {
    if (event.key === "Escape") { event.preventDefault(); setEditing(false); caption.blur(); }
    else if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); decide("accept"); }
    else if (event.key === "Enter" && !event.shiftKey) event.preventDefault();  // a caption is one line
  });
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    var tag = (event.target && event.target.tagName) || "";
    if (tag === "INPUT" || tag === "SELECT" || (tag === "TEXTAREA" && !event.target.readOnly)) return;
    var kind = { a: "accept", A: "accept", r: "reject", R: "reject", e: "edit", E: "edit", u: "undo", U: "undo" }[event.key];
    if (!kind) return;
    event.preventDefault();
    if (kind === "edit") { if (current && !stopped) setEditing(true); }
    else if (kind === "undo") undo();
    else decide(kind);
  });

  // The server rendered the first candidate for a browser without JavaScript; from here the page
  // takes the queue from the API (the first candidate again, with the next ones).
  caption.readOnly = true;
  fetchMore().then(function () {
    if (upcoming.length) {
      show(upcoming.shift());
      setStatus(view === "dropped" ? "Accept the candidate anyway, or reject it for good." : "Accept or reject the candidate.", false);
    }
    else if (!stopped) finish();
  });
})();
