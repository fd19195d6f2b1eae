// The calendar: drag a post that is not published yet to another day (pointer events, so a mouse,
// a pen or a finger on the ⠿ handle all work); the server moves it or says why not, and a refusal
// leaves the post where it was. A click without a drag opens the post. On a post's page: the
// preview frame takes the export's aspect (the CSP allows no inline style) and "more" shows the rest.
(function () {
  "use strict";
  document.querySelectorAll(".ig-media[data-aspect]").forEach(function (box) { box.style.aspectRatio = box.dataset.aspect; });
  var more = document.getElementById("preview-more");
  if (more) {
    more.addEventListener("click", function () {
      document.getElementById("preview-rest").hidden = false;
      more.previousElementSibling.hidden = true;
      more.hidden = true;
    });
  }

  var grid = document.getElementById("calendar");
  if (!grid) return;
  // The thumbnails: one sprite per page (the server's), each card showing its tile. The CSP allows
  // no inline style, so the tiles are placed here; on the body, so a dragged card's copy has its own.
  var sprite = document.getElementById("cal-sprite");
  if (sprite) {
    var columns = +grid.dataset.spriteColumns, rows = +grid.dataset.spriteRows;
    document.body.style.setProperty("--sprite", 'url("' + sprite.src + '")');
    document.body.style.setProperty("--sprite-size", columns * 100 + "% " + rows * 100 + "%");
    grid.querySelectorAll(".cal-tile").forEach(function (tile) {
      var i = +tile.dataset.tile, column = i % columns, row = Math.floor(i / columns);
      tile.style.backgroundPosition = (columns > 1 ? column / (columns - 1) * 100 : 0) + "% " +
        (rows > 1 ? row / (rows - 1) * 100 : 0) + "%";
    });
  }
  var errorBox = document.getElementById("cal-error");
  var csrf = document.querySelector("meta[name=csrf-token]").content;
  var drag = null; // {card, id, from, x, y, ghost, over, pointer}
  var DRAG_PX = 6;

  function dayAt(x, y) {
    var under = document.elementFromPoint(x, y);
    return under ? under.closest(".cal-day") : null;
  }

  function mark(day) {
    if (drag.over === day) return;
    if (drag.over) drag.over.classList.remove("drop-target");
    drag.over = day;
    if (day && day !== drag.from) day.classList.add("drop-target");
  }

  function showError(text) {
    document.querySelectorAll(".flash").forEach(function (note) { note.remove(); });
    errorBox.textContent = text;
    errorBox.hidden = false;
    errorBox.scrollIntoView({block: "nearest"});
  }

  function send(id, day) {
    grid.classList.add("busy");
    fetch("/api/calendar/posts/" + id + "/move", {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify({day: day})
    }).then(function (response) {
      return response.json().then(function (body) { return {ok: response.ok, body: body}; },
                                  function () { return {ok: false, body: {error: "the server answered " + response.status}}; });
    }).then(function (answer) {
      if (answer.ok) { window.location.reload(); return; }
      grid.classList.remove("busy");
      showError("Post " + id + " was not moved: " + (answer.body.error || "refused"));
    }, function () {
      grid.classList.remove("busy");
      showError("Post " + id + " was not moved: the form did not answer. Check your connection and try again.");
    });
  }

  grid.addEventListener("pointerdown", function (event) {
    var card = event.target.closest(".cal-post[data-movable]");
    if (!card || event.button !== 0) return;
    // A finger scrolls the page unless it starts on the handle; a mouse or pen drags the whole card.
    if (event.pointerType === "touch" && !event.target.closest(".cal-handle")) return;
    drag = {card: card, id: card.dataset.postId, from: card.closest(".cal-day"), x: event.clientX, y: event.clientY,
            ghost: null, over: null, pointer: event.pointerId};
  });

  document.addEventListener("pointermove", function (event) {
    if (!drag || event.pointerId !== drag.pointer) return;
    if (!drag.ghost) {
      if (Math.abs(event.clientX - drag.x) + Math.abs(event.clientY - drag.y) < DRAG_PX) return;
      drag.ghost = drag.card.cloneNode(true);
      drag.ghost.removeAttribute("id");
      drag.ghost.classList.add("cal-ghost");
      drag.ghost.style.width = drag.card.offsetWidth + "px";
      document.body.appendChild(drag.ghost);
      drag.card.classList.add("dragging");
    }
    event.preventDefault();
    drag.ghost.style.left = (event.clientX + 8) + "px";
    drag.ghost.style.top = (event.clientY + 8) + "px";
    mark(dayAt(event.clientX, event.clientY));
  });

  function end(event) {
    if (!drag || event.pointerId !== drag.pointer) return;
    var done = drag;
    drag = null;
    if (!done.ghost) return; // a click: the link opens the post
    done.ghost.remove();
    done.card.classList.remove("dragging");
    if (done.over) done.over.classList.remove("drop-target");
    // The click that follows a drag must not open the post.
    done.card.addEventListener("click", function (click) { click.preventDefault(); }, {once: true});
    var target = event.type === "pointerup" ? dayAt(event.clientX, event.clientY) : null;
    if (target && target !== done.from) send(done.id, target.dataset.day);
  }
  document.addEventListener("pointerup", end);
  document.addEventListener("pointercancel", end);
  grid.addEventListener("dragstart", function (event) { event.preventDefault(); });
})();
