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
// Answers: click/tap the better image or its button, ← / →, or on a touch screen swipe an image
// right (it wins) or left (the other one wins); K / L kill the left / right image; S skips.
// Zoom (Z, or the Zoom button on an image) opens both images at full size in a lightbox with one
// zoom and pan for both; it takes no votes.
// Undo (U) takes back the last answer still within the server's window (data-undo-ms): a vote is
// undone on the server (the vote is taken out of every count), a kill is a restore, a skip is
// reopened; the pair comes back on screen to be answered again.
// "Pairs not voted yet" is never estimated here: every answer's reply carries the server's count
// (review_views.unvoted_pairs, as the queue and the gallery count), and the page keeps the newest.
(function () {
  "use strict";
  var SETTLE_MS = 300;
  var SWIPE_PX = 70;         // a horizontal move this long (and mostly horizontal) is a swipe
  var root = document.getElementById("vote");
  if (!root) return;
  var stepId = root.dataset.stepId;
  var undoMs = parseInt(root.dataset.undoMs, 10) || 300000;
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var img = { left: document.getElementById("img-left"), right: document.getElementById("img-right") };
  var label = { left: document.getElementById("id-left"), right: document.getElementById("id-right") };
  var statusLine = document.getElementById("status");
  var remainingEl = document.getElementById("remaining");
  var doneBox = document.getElementById("done");
  var lostList = document.getElementById("lost");
  var undoButton = document.getElementById("undo");
  var pairBox = root.querySelector(".pair");
  var actionsBox = root.querySelector(".actions");

  var current = null;        // the offer on screen
  var upcoming = [];         // offers to show next, first first (the preloaded pair; a pair put back by an undo)
  var prefetching = null;    // promise of the fetch filling `upcoming`
  var held = new Set();      // offer ids on the page or with an answer in flight
  var inflight = new Set();  // answer POST promises
  var killed = new Set();    // candidates killed from this page
  var history = [];          // answers that may be undone, newest last: {kind, offer, at, result, candidate}
  var undoing = false;
  var votes = 0;             // votes the server confirmed (less those undone)
  var asOf = -1;             // the newest server count shown (its review event id)
  var acceptAt = Infinity;   // performance.now() from which the pair on screen takes input
  var settleTimer = null, undoTimer = null;
  var stopped = false;       // the session has ended: no more answers

  if (window.matchMedia("(max-width: 719px)").matches) document.getElementById("judge").open = false;

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

  // A failure that lost no answer (fetching a pair, an undo).
  function report(err) {
    var text = explain(err);
    if (!stopped) setStatus(text.charAt(0).toUpperCase() + text.slice(1), true);
    if (sessionGone(err)) stop();
  }

  function pairName(offer) {
    return "#" + offer.left.id + " / #" + offer.right.id;
  }

  // The server's count of pairs not voted yet; a reply older than the one shown is ignored.
  function applyCounts(data) {
    if (!data || typeof data.remaining !== "number" || data.as_of < asOf) return;
    asOf = data.as_of;
    remainingEl.textContent = data.remaining + " pair" + (data.remaining === 1 ? "" : "s") + " not voted yet.";
    root.dataset.remaining = String(data.remaining);
  }

  // Once no answer is in flight, ask for the count once more: replies that raced each other may
  // each have missed the other's answer.
  function settleCounts() {
    if (inflight.size || undoing) return;
    root.dataset.countsSettled = "0";
    fetch("/api/steps/" + stepId + "/counts", { headers: { "Accept": "application/json" }, credentials: "same-origin", cache: "no-store" })
      .then(readJson).then(function (data) {
        applyCounts(data);
        if (!inflight.size && !undoing) root.dataset.countsSettled = "1";
      }).catch(report);
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

  function withImages(offer) {
    // Keep the Image objects so the decoded pictures stay in memory until shown.
    return Promise.all([preload(offer.left.url), preload(offer.right.url)]).then(function (images) {
      offer.images = images;
      return offer;
    });
  }

  // `offScreen`: the next pair, held off screen until `show` tells the server it is shown.
  function fetchOffer(offScreen) {
    var params = [];
    if (held.size) params.push("exclude=" + Array.from(held).join(","));
    if (offScreen) params.push("preload=1");
    return fetch("/api/steps/" + stepId + "/pair" + (params.length ? "?" + params.join("&") : ""), {
      headers: { "Accept": "application/json" }, credentials: "same-origin", cache: "no-store"
    }).then(readJson).then(function (offer) {
      applyCounts(offer);
      if (offer.offer_id === null) return null;
      held.add(offer.offer_id);
      offer.shown = offScreen ? null : Promise.resolve();
      return withImages(offer);
    });
  }

  function prefetch() {
    if (upcoming.length || prefetching) return;
    root.dataset.nextReady = "0";
    prefetching = fetchOffer(true).then(function (offer) {
      if (offer) upcoming.push(offer);
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
    root.dataset.done = "0";
    doneBox.hidden = true;
    pairBox.hidden = false;
    actionsBox.hidden = false;
    img.left.src = offer.left.url || "data:,";
    img.right.src = offer.right.url || "data:,";
    label.left.textContent = offer.left.id;
    label.right.textContent = offer.right.id;
    root.dataset.offerId = offer.offer_id;
  }

  function finish() {
    current = null;
    root.dataset.done = "1";
    delete root.dataset.offerId;  // nothing on screen: no stale pair (a killed image) stays in the page
    img.left.src = img.right.src = "data:,";
    label.left.textContent = label.right.textContent = "";
    root.classList.remove("busy");
    doneBox.hidden = false;
    pairBox.hidden = true;
    actionsBox.hidden = !history.length;  // Undo stays while there is something to undo
  }

  function release(offer) {
    held.delete(offer.offer_id);
  }

  // The first usable pair of `upcoming` (dropping those with a killed image), or null.
  function takeUpcoming() {
    while (upcoming.length) {
      var offer = upcoming.shift();
      if (!hasKilled(offer)) return offer;
      release(offer);
    }
    return null;
  }

  // Show the preloaded pair now; only when there is none, wait for the server.
  function advance() {
    current = null;
    var offer = takeUpcoming();
    if (offer) { show(offer); prefetch(); return; }
    root.classList.add("busy");
    var wait = prefetching || Promise.resolve();
    wait.then(function () {
      var ready = takeUpcoming();
      if (ready) { show(ready); prefetch(); return null; }
      // Nothing usable ahead: let the answers land (a kill, say), then ask once more.
      return Promise.allSettled(Array.from(inflight)).then(function () { return fetchOffer(false); }).then(function (fresh) {
        if (current) { if (fresh) upcoming.push(fresh); return; }  // an undo put a pair on screen meanwhile
        if (fresh) { show(fresh); prefetch(); } else { finish(); }
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

  function refreshUndo() {
    clearTimeout(undoTimer);
    var now = Date.now();
    while (history.length && now - history[0].at > undoMs) history.shift();
    var last = history[history.length - 1];
    undoButton.disabled = stopped || undoing || !last;
    root.dataset.undoable = last ? last.kind : "";
    if (last) undoTimer = setTimeout(refreshUndo, Math.max(50, history[0].at + undoMs - now + 10));
    else if (root.dataset.done === "1") actionsBox.hidden = true;
  }

  function track(offer, what, request) {
    var tracked = request.catch(function (err) {
      lose(offer, what, err);
      return null;
    }).then(function (data) {
      release(offer);
      inflight.delete(tracked);
      applyCounts(data);
      settleCounts();
      return data;
    });
    inflight.add(tracked);
    root.dataset.countsSettled = "0";
    return tracked;
  }

  function answer(kind) {
    if (kind === "undo") { undo(); return; }
    if (kind === "zoom") { openLightbox(); return; }
    // Nothing on screen, a pair shown too recently to have been seen, or a session that has ended.
    if (!current || stopped || performance.now() < acceptAt) return;
    var offer = current;
    var request, what, entry = { kind: kind, offer: offer, at: Date.now() };
    // Every answer waits until the server knows the pair is on screen.
    function send(url, body) {
      return offer.shown.then(function () { return post(url, body); });
    }
    if (kind === "left" || kind === "right") {
      var winner = offer[kind], loser = kind === "left" ? offer.right : offer.left;
      what = "vote";
      entry.kind = "vote";
      request = send("/api/votes", { offer_id: offer.offer_id, winner_id: winner.id, loser_id: loser.id })
        .then(function (data) {
          votes += 1;
          root.dataset.votes = String(votes);
          setStatus("Voted #" + winner.id + " over #" + loser.id + ".", false);
          return data;
        });
    } else if (kind === "skip") {
      what = "skip";
      request = send("/api/offers/" + offer.offer_id + "/skip", {})
        .then(function (data) { setStatus("Skipped " + pairName(offer) + ".", false); return data; });
    } else if (kind === "kill-left" || kind === "kill-right") {
      var doomed = offer[kind === "kill-left" ? "left" : "right"].id;
      what = "kill of #" + doomed;
      entry.kind = "kill";
      entry.candidate = doomed;
      killed.add(doomed);
      request = send("/api/candidates/" + doomed + "/kill", { offer_id: offer.offer_id })
        .then(function (data) { setStatus("Killed #" + doomed + ". Undo brings it back.", false); return data; },
              function (err) { killed.delete(doomed); throw err; });
    } else {
      return;
    }
    entry.result = track(offer, what, request);
    history.push(entry);
    if (history.length > 20) history.shift();
    refreshUndo();
    advance();
  }

  // Take back the newest answer still in the window: once it has landed, ask the server to undo it;
  // the pair comes back on screen (the pair that was there goes back to the front of the line).
  function undo() {
    if (stopped || undoing) return;
    refreshUndo();
    var entry = history.pop();
    if (!entry) return;
    undoing = true;
    refreshUndo();
    root.dataset.undoing = "1";
    root.dataset.countsSettled = "0";
    var offer = entry.offer;
    entry.result.then(function (data) {
      if (!data) throw Object.assign(new Error("it was never recorded, so there is nothing to undo"), { status: 0 });
      if (entry.kind === "vote") return post("/api/votes/" + data.vote_id + "/undo", {});
      if (entry.kind === "kill") return post("/api/candidates/" + entry.candidate + "/restore", { offer_id: offer.offer_id });
      return post("/api/offers/" + offer.offer_id + "/undo-skip", {});
    }).then(function (data) {
      if (entry.kind === "vote") { votes -= 1; root.dataset.votes = String(votes); }
      if (entry.kind === "kill") killed.delete(entry.candidate);
      var word = { vote: "Your vote on ", kill: "The kill of #" + entry.candidate + " on ", skip: "Your skip of " }[entry.kind];
      setStatus(word + pairName(offer) + " is undone" + (data.pair ? ": choose again." : "."), false);
      root.dataset.undone = String((parseInt(root.dataset.undone || "0", 10)) + 1);
      applyCounts(data);
      if (data.pair) {
        var again = data.pair;
        again.shown = Promise.resolve();
        held.add(again.offer_id);
        return withImages(again).then(function () {
          if (current) upcoming.unshift(current);
          show(again);
        });
      }
      return null;
    }).catch(function (err) {
      if (err.status === 0) setStatus("Nothing to undo: " + err.message, true); else report(err);
    }).then(function () {
      undoing = false;
      delete root.dataset.undoing;
      refreshUndo();
      settleCounts();
    });
  }

  // The lightbox: both images of the pair on screen at full size, one zoom and pan for both (wheel,
  // drag, pinch, + / −), so a detail is compared at the same place in each. It takes no votes.
  var lightbox = document.getElementById("lightbox");
  var lbImg = { left: document.getElementById("lb-left"), right: document.getElementById("lb-right") };
  var view = { scale: 1, x: 0, y: 0 };
  var MAX_SCALE = 8;
  function applyView() {
    view.scale = Math.min(MAX_SCALE, Math.max(1, view.scale));
    if (view.scale === 1) { view.x = 0; view.y = 0; }
    var transform = "translate(" + view.x + "px, " + view.y + "px) scale(" + view.scale + ")";
    lbImg.left.style.transform = lbImg.right.style.transform = transform;
    lightbox.dataset.scale = view.scale.toFixed(3);
  }
  // Zoom by `factor` keeping the point (px, py), relative to a pane's centre, where it is.
  function zoomAt(factor, px, py) {
    var before = view.scale;
    view.scale = Math.min(MAX_SCALE, Math.max(1, before * factor));
    var k = view.scale / before;
    view.x = px - (px - view.x) * k;
    view.y = py - (py - view.y) * k;
    applyView();
  }
  function openLightbox() {
    if (!current) return;
    lbImg.left.src = current.left.url || "data:,";
    lbImg.right.src = current.right.url || "data:,";
    document.getElementById("lb-id-left").textContent = current.left.id;
    document.getElementById("lb-id-right").textContent = current.right.id;
    view = { scale: 1, x: 0, y: 0 };
    applyView();
    lightbox.hidden = false;
    lightbox.dataset.offerId = current.offer_id;
    document.getElementById("lb-close").focus();
  }
  function closeLightbox() {
    lightbox.hidden = true;
    acceptAt = Math.max(acceptAt, performance.now() + SETTLE_MS);  // no vote from the closing tap
  }
  function paneCentre(pane, event) {
    var box = pane.getBoundingClientRect();
    return { x: event.clientX - box.left - box.width / 2, y: event.clientY - box.top - box.height / 2 };
  }
  document.getElementById("lb-in").addEventListener("click", function () { zoomAt(1.5, 0, 0); });
  document.getElementById("lb-out").addEventListener("click", function () { zoomAt(1 / 1.5, 0, 0); });
  document.getElementById("lb-fit").addEventListener("click", function () { view = { scale: 1, x: 0, y: 0 }; applyView(); });
  document.getElementById("lb-close").addEventListener("click", closeLightbox);
  lightbox.querySelectorAll(".lb-pane").forEach(function (pane) {
    var pointers = new Map(), pinch = null;
    pane.addEventListener("wheel", function (event) {
      event.preventDefault();
      var at = paneCentre(pane, event);
      zoomAt(Math.exp(-event.deltaY / 300), at.x, at.y);
    }, { passive: false });
    pane.addEventListener("pointerdown", function (event) {
      pane.setPointerCapture(event.pointerId);
      pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
      if (pointers.size === 2) {
        var p = Array.from(pointers.values());
        pinch = Math.hypot(p[0].x - p[1].x, p[0].y - p[1].y);
      }
    });
    pane.addEventListener("pointermove", function (event) {
      var last = pointers.get(event.pointerId);
      if (!last) return;
      var now = { x: event.clientX, y: event.clientY };
      pointers.set(event.pointerId, now);
      if (pointers.size === 2 && pinch) {
        var p = Array.from(pointers.values());
        var distance = Math.hypot(p[0].x - p[1].x, p[0].y - p[1].y);
        var mid = paneCentre(pane, { clientX: (p[0].x + p[1].x) / 2, clientY: (p[0].y + p[1].y) / 2 });
        zoomAt(distance / pinch, mid.x, mid.y);
        pinch = distance;
      } else if (pointers.size === 1 && view.scale > 1) {
        view.x += now.x - last.x;
        view.y += now.y - last.y;
        applyView();
      }
    });
    function lift(event) {
      pointers.delete(event.pointerId);
      if (pointers.size < 2) pinch = null;
    }
    pane.addEventListener("pointerup", lift);
    pane.addEventListener("pointercancel", lift);
  });

  document.addEventListener("keydown", function (event) {
    if (!lightbox.hidden) {  // the lightbox takes no votes: only its own keys
      var zoomKey = { "+": 1.5, "=": 1.5, "-": 1 / 1.5 }[event.key];
      if (event.key === "Escape") { event.preventDefault(); closeLightbox(); }
      else if (zoomKey) { event.preventDefault(); zoomAt(zoomKey, 0, 0); }
      else if (event.key === "0") { event.preventDefault(); view = { scale: 1, x: 0, y: 0 }; applyView(); }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    var tag = (event.target && event.target.tagName) || "";
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    var kind = { ArrowLeft: "left", ArrowRight: "right", k: "kill-left", K: "kill-left", l: "kill-right", L: "kill-right",
                 s: "skip", S: "skip", u: "undo", U: "undo", z: "zoom", Z: "zoom" }[event.key];
    if (!kind) return;
    event.preventDefault();
    answer(kind);
  });
  var swipedAt = -Infinity;
  root.querySelectorAll("[data-action]").forEach(function (button) {
    button.addEventListener("click", function () {
      // the click a swipe or a mouse drag on an image may leave behind
      if (button.classList.contains("pick") && performance.now() - swipedAt < 500) return;
      answer(button.dataset.action);
    });
  });

  // Swipes on a touch screen: an image dragged right wins, dragged left loses (the other one wins).
  // A mouse drag votes for nothing (it is not taken as a click either).
  root.querySelectorAll(".side").forEach(function (figure) {
    var side = figure.dataset.side, other = side === "left" ? "right" : "left";
    var picture = figure.querySelector("img");
    var start = null;
    function reset() {
      start = null;
      picture.style.transform = "";
      figure.classList.remove("swipe-win", "swipe-lose");
    }
    figure.addEventListener("pointerdown", function (event) {
      if (!current) return;
      start = { x: event.clientX, y: event.clientY, id: event.pointerId, mouse: event.pointerType === "mouse" };
    });
    figure.addEventListener("pointermove", function (event) {
      if (!start || event.pointerId !== start.id || start.mouse) return;
      var dx = event.clientX - start.x;
      picture.style.transform = "translateX(" + Math.max(-120, Math.min(120, dx)) + "px)";
      figure.classList.toggle("swipe-win", dx >= SWIPE_PX);
      figure.classList.toggle("swipe-lose", dx <= -SWIPE_PX);
    });
    figure.addEventListener("pointerup", function (event) {
      if (!start || event.pointerId !== start.id) return;
      var dx = event.clientX - start.x, dy = event.clientY - start.y, mouse = start.mouse;
      reset();
      if (mouse) {  // a mouse drag is neither a swipe nor a click on the image
        if (Math.abs(dx) + Math.abs(dy) > 10) swipedAt = performance.now();
        return;
      }
      if (Math.abs(dx) >= SWIPE_PX && Math.abs(dx) > 1.5 * Math.abs(dy)) {
        swipedAt = performance.now();
        root.dataset.swipes = String((parseInt(root.dataset.swipes || "0", 10)) + 1);
        answer(dx > 0 ? side : other);
      }
    });
    figure.addEventListener("pointercancel", reset);
  });

  fetchOffer(false).then(function (offer) {
    if (!offer) { finish(); root.dataset.nextReady = "1"; return; }
    show(offer);
    setStatus("Which of the two is better? Judge by the points above.", false);
    prefetch();
  }).catch(report);
})();
