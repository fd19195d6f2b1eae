// The A/B page. The page always holds the pair on screen and the NEXT pair, already fetched with
// its images preloaded, so a vote swaps pictures at once while its POST goes in the background.
// Every offer the page holds, or whose answer is still in flight, is sent as `exclude` so the
// server never offers the same pair twice.
(function () {
  "use strict";
  var root = document.getElementById("vote");
  if (!root) return;
  var stepId = root.dataset.stepId;
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var img = { left: document.getElementById("img-left"), right: document.getElementById("img-right") };
  var label = { left: document.getElementById("id-left"), right: document.getElementById("id-right") };
  var statusLine = document.getElementById("status");
  var remainingEl = document.getElementById("remaining");
  var probabilityEl = document.getElementById("probability");
  var doneBox = document.getElementById("done");

  var current = null;        // the offer on screen
  var next = null;           // the preloaded offer (null: none yet, or none left)
  var prefetching = null;    // promise of the fetch filling `next`
  var held = new Set();      // offer ids on the page or with an answer in flight
  var inflight = new Set();  // answer POST promises
  var killed = new Set();    // candidates killed from this page
  var votes = 0;             // votes the server confirmed
  var pressed = 0;           // votes asked for (confirmed or not)
  var pendingVotes = 0;      // vote POSTs in flight

  function setStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("is-error", !!isError);
  }

  function preload(url) {
    return new Promise(function (resolve) {
      if (!url) { resolve(null); return; }
      var image = new Image();
      image.onload = image.onerror = function () { resolve(image); };
      image.src = url;
    });
  }

  function readJson(resp) {
    return resp.json().catch(function () { return {}; }).then(function (data) {
      if (!resp.ok) {
        var err = new Error(resp.status + ": " + (data.error || resp.statusText));
        err.status = resp.status;
        throw err;
      }
      return data;
    });
  }

  function explain(err) {
    if (err.status === 401) return "Your session has ended: log in again (reload the page).";
    return "The server refused: " + err.message;
  }

  function fetchOffer() {
    // The server counts the unvoted pairs now; votes still in flight are not in its count yet.
    var pressedAtFetch = pressed, pendingAtFetch = pendingVotes;
    var query = held.size ? "?exclude=" + Array.from(held).join(",") : "";
    return fetch("/api/steps/" + stepId + "/pair" + query, {
      headers: { "Accept": "application/json" }, credentials: "same-origin", cache: "no-store"
    }).then(readJson).then(function (offer) {
      if (offer.offer_id === null) return null;
      held.add(offer.offer_id);
      offer.pressedAtFetch = pressedAtFetch;
      offer.pendingAtFetch = pendingAtFetch;
      // Keep the Image objects so the decoded pictures stay in memory until shown.
      return Promise.all([preload(offer.left.url), preload(offer.right.url)]).then(function (images) {
        offer.images = images;
        return offer;
      });
    });
  }

  function prefetch() {
    if (next || prefetching) return;
    root.dataset.nextReady = "0";
    prefetching = fetchOffer().then(function (offer) {
      next = offer;
    }).catch(function (err) {
      setStatus(explain(err), true);
    }).then(function () {
      prefetching = null;
      root.dataset.nextReady = "1";
    });
  }

  function hasKilled(offer) {
    return killed.has(offer.left.id) || killed.has(offer.right.id);
  }

  function show(offer) {
    current = offer;
    root.classList.remove("busy");
    img.left.src = offer.left.url || "data:,";
    img.right.src = offer.right.url || "data:,";
    label.left.textContent = offer.left.id;
    label.right.textContent = offer.right.id;
    root.dataset.offerId = offer.offer_id;
    var left = Math.max(0, offer.remaining - offer.pendingAtFetch - (pressed - offer.pressedAtFetch));
    remainingEl.textContent = left + " pair" + (left === 1 ? "" : "s") + " not voted yet.";
    probabilityEl.textContent = "Shown with probability " + offer.probability.toFixed(3) + " (" + offer.strategy + ").";
  }

  function finish() {
    current = null;
    root.dataset.done = "1";
    delete root.dataset.offerId;  // nothing on screen: no stale pair (a killed image) stays in the page
    img.left.src = img.right.src = "data:,";
    label.left.textContent = label.right.textContent = "";
    root.classList.remove("busy");
    doneBox.hidden = false;
    document.querySelector(".pair").hidden = true;
    document.querySelector(".actions").hidden = true;
    remainingEl.textContent = "";
    probabilityEl.textContent = "";
  }

  function release(offer) {
    held.delete(offer.offer_id);
  }

  // Show the preloaded pair now; only when there is none, wait for the server.
  function advance() {
    current = null;
    if (next && !hasKilled(next)) {
      var offer = next;
      next = null;
      show(offer);
      prefetch();
      return;
    }
    if (next) { release(next); next = null; }
    root.classList.add("busy");
    var wait = prefetching || Promise.resolve();
    wait.then(function () {
      if (next && !hasKilled(next)) {
        var offer = next;
        next = null;
        show(offer);
        prefetch();
        return null;
      }
      if (next) { release(next); next = null; }
      // Nothing usable ahead: let the answers land (a kill, say), then ask once more.
      return Promise.allSettled(Array.from(inflight)).then(fetchOffer).then(function (offer) {
        if (offer) { show(offer); prefetch(); } else { finish(); }
      });
    }).catch(function (err) {
      root.classList.remove("busy");
      setStatus(explain(err), true);
    });
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body)
    }).then(readJson);
  }

  function answer(kind) {
    if (!current) return;
    var offer = current;
    var request;
    if (kind === "left" || kind === "right") {
      var winner = offer[kind], loser = kind === "left" ? offer.right : offer.left;
      pressed += 1;
      pendingVotes += 1;
      request = post("/api/votes", { offer_id: offer.offer_id, winner_id: winner.id, loser_id: loser.id })
        .then(function () {
          votes += 1;
          root.dataset.votes = String(votes);
          setStatus("Voted #" + winner.id + " over #" + loser.id + ".", false);
        }).finally(function () { pendingVotes -= 1; });
    } else if (kind === "skip") {
      request = post("/api/offers/" + offer.offer_id + "/skip", {})
        .then(function () { setStatus("Skipped #" + offer.left.id + " / #" + offer.right.id + ".", false); });
    } else if (kind === "kill") {
      killed.add(offer.left.id);
      request = post("/api/candidates/" + offer.left.id + "/kill", { offer_id: offer.offer_id })
        .then(function () { setStatus("Killed #" + offer.left.id + ".", false); });
    } else {
      return;
    }
    var tracked = request.catch(function (err) {
      setStatus(explain(err), true);
    }).then(function () {
      release(offer);
      inflight.delete(tracked);
    });
    inflight.add(tracked);
    advance();
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    var tag = (event.target && event.target.tagName) || "";
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    var kind = { ArrowLeft: "left", ArrowRight: "right", k: "kill", K: "kill", s: "skip", S: "skip" }[event.key];
    if (!kind) return;
    event.preventDefault();
    answer(kind);
  });
  root.querySelectorAll("[data-action]").forEach(function (button) {
    button.addEventListener("click", function () { answer(button.dataset.action); });
  });

  fetchOffer().then(function (offer) {
    if (!offer) { finish(); root.dataset.nextReady = "1"; return; }
    show(offer);
    setStatus("← / → vote · K kills the left image · S skips", false);
    prefetch();
  }).catch(function (err) { setStatus(explain(err), true); });
})();
