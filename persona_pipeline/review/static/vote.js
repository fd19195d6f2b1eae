// The A/B page. The page always holds the pair on screen and the NEXT pair, already fetched with
// its images preloaded, so a vote swaps pictures at once while its POST goes in the background.
// Every offer the page holds, or whose answer is still in flight, is sent as `exclude` so the
// server never offers the same pair twice.
// The next pair is fetched with ?preload=1: the server takes no answer on it until the page says it
// is on screen (POST /api/offers/{id}/shown when it is shown; an answer waits for that). And a pair
// takes input only once it has been on screen for SETTLE_MS, so the second click of a double click
// never lands on the pair that just replaced the one it was meant for.
// An answer the server refuses is not passed over: the page names its pair (#lost keeps the list),
// and when the session has ended it takes no more answers, which could only be lost too.
(function () {
  "use strict";
  var SETTLE_MS = 300;
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
  var lostList = document.getElementById("lost");

  var current = null;        // the offer on screen
  var next = null;           // the preloaded offer (null: none yet, or none left)
  var prefetching = null;    // promise of the fetch filling `next`
  var held = new Set();      // offer ids on the page or with an answer in flight
  var inflight = new Set();  // answer POST promises
  var killed = new Set();    // candidates killed from this page
  var votes = 0;             // votes the server confirmed
  var pressed = 0;           // votes asked for (confirmed or not)
  var pendingVotes = 0;      // vote POSTs in flight
  var acceptAt = Infinity;   // performance.now() from which the pair on screen takes input
  var settleTimer = null;
  var stopped = false;       // the session has ended: no more answers

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

  function sessionGone(err) {
    return err.status === 401 || err.status === 403;
  }

  function explain(err) {
    if (err.status === 401) return "your session has ended: log in again (reload the page).";
    if (err.status === 403) return "the server no longer takes answers from this page (" + err.message + "): reload it.";
    return "the server refused: " + err.message;
  }

  function stop() {
    stopped = true;
    root.dataset.stopped = "1";
    root.querySelectorAll("[data-action]").forEach(function (button) { button.disabled = true; });
  }

  // A failure that lost no answer (fetching a pair).
  function report(err) {
    var text = explain(err);
    if (!stopped) setStatus(text.charAt(0).toUpperCase() + text.slice(1), true);
    if (sessionGone(err)) stop();
  }

  function pairName(offer) {
    return "#" + offer.left.id + " / #" + offer.right.id;
  }

  // An answer that was not recorded: say which pair it was on, and keep it in the list.
  function lose(offer, what, err) {
    var text = "The " + what + " on " + pairName(offer) + " was not recorded: " + explain(err);
    setStatus(text, true);
    var item = document.createElement("li");
    item.textContent = text;
    lostList.appendChild(item);
    lostList.hidden = false;
    if (sessionGone(err)) stop();
  }

  // `offScreen`: the next pair, held off screen until `show` tells the server it is shown.
  function fetchOffer(offScreen) {
    // The server counts the unvoted pairs now; votes still in flight are not in its count yet.
    var pressedAtFetch = pressed, pendingAtFetch = pendingVotes;
    var params = [];
    if (held.size) params.push("exclude=" + Array.from(held).join(","));
    if (offScreen) params.push("preload=1");
    return fetch("/api/steps/" + stepId + "/pair" + (params.length ? "?" + params.join("&") : ""), {
      headers: { "Accept": "application/json" }, credentials: "same-origin", cache: "no-store"
    }).then(readJson).then(function (offer) {
      if (offer.offer_id === null) return null;
      held.add(offer.offer_id);
      offer.shown = offScreen ? null : Promise.resolve();
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
    prefetching = fetchOffer(true).then(function (offer) {
      next = offer;
    }).catch(report).then(function () {
      prefetching = null;
      root.dataset.nextReady = "1";
    });
  }

  function hasKilled(offer) {
    return killed.has(offer.left.id) || killed.has(offer.right.id);
  }

  function show(offer) {
    current = offer;
    if (!offer.shown) {
      offer.shown = post("/api/offers/" + offer.offer_id + "/shown", {});
      offer.shown.catch(function () {});  // its failure is the failure of the answer that waits on it
    }
    acceptAt = performance.now() + SETTLE_MS;
    root.dataset.inputReady = "0";
    clearTimeout(settleTimer);
    settleTimer = setTimeout(function () {
      if (current === offer) root.dataset.inputReady = "1";
    }, SETTLE_MS);
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
      return Promise.allSettled(Array.from(inflight)).then(function () { return fetchOffer(false); }).then(function (offer) {
        if (offer) { show(offer); prefetch(); } else { finish(); }
      });
    }).catch(function (err) {
      root.classList.remove("busy");
      report(err);
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
    // Nothing on screen, a pair shown too recently to have been seen, or a session that has ended.
    if (!current || stopped || performance.now() < acceptAt) return;
    var offer = current;
    var request, what;
    // Every answer waits until the server knows the pair is on screen.
    function send(url, body) {
      return offer.shown.then(function () { return post(url, body); });
    }
    if (kind === "left" || kind === "right") {
      var winner = offer[kind], loser = kind === "left" ? offer.right : offer.left;
      what = "vote";
      pressed += 1;
      pendingVotes += 1;
      request = send("/api/votes", { offer_id: offer.offer_id, winner_id: winner.id, loser_id: loser.id })
        .then(function () {
          votes += 1;
          root.dataset.votes = String(votes);
          setStatus("Voted #" + winner.id + " over #" + loser.id + ".", false);
        }).finally(function () { pendingVotes -= 1; });
    } else if (kind === "skip") {
      what = "skip";
      request = send("/api/offers/" + offer.offer_id + "/skip", {})
        .then(function () { setStatus("Skipped " + pairName(offer) + ".", false); });
    } else if (kind === "kill") {
      what = "kill of #" + offer.left.id;
      killed.add(offer.left.id);
      request = send("/api/candidates/" + offer.left.id + "/kill", { offer_id: offer.offer_id })
        .then(function () { setStatus("Killed #" + offer.left.id + ".", false); },
              function (err) { killed.delete(offer.left.id); throw err; });
    } else {
      return;
    }
    var tracked = request.catch(function (err) {
      lose(offer, what, err);
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

  fetchOffer(false).then(function (offer) {
    if (!offer) { finish(); root.dataset.nextReady = "1"; return; }
    show(offer);
    setStatus("← / → vote · K kills the left image · S skips", false);
    prefetch();
  }).catch(report);
})();
