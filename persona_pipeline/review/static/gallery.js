// The gallery: CI bars from data attributes (the CSP allows no inline style), the low-vote
// warning kept in step with K as the reviewer changes it, the two images ticked for comparison,
// and the kill / restore confirmations (Cancel and Escape close them). Without script the forms
// still work: the server checks the comparison has two images, and a confirmation closes by
// tapping its button again.
(function () {
  "use strict";
  document.querySelectorAll(".cibar").forEach(function (bar) {
    bar.querySelector("span").style.left = bar.dataset.left + "%";
    bar.querySelector("span").style.width = bar.dataset.width + "%";
    bar.querySelector("i").style.left = bar.dataset.mark + "%";
  });

  // Kill / restore: one confirmation open at a time.
  var confirms = Array.prototype.slice.call(document.querySelectorAll("details.confirm"));
  confirms.forEach(function (box) {
    box.addEventListener("toggle", function () {
      if (!box.open) return;
      confirms.forEach(function (other) { if (other !== box) other.open = false; });
      var field = box.querySelector("input[name=reason]");
      if (field) field.focus();
    });
    var cancel = box.querySelector("[data-cancel]");
    if (cancel) cancel.addEventListener("click", function () { box.open = false; box.querySelector("summary").focus(); });
  });
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape") return;
    confirms.forEach(function (box) { box.open = false; });
  });

  // Compare: at most two ticked (a third unticks the oldest); the button waits for two.
  var compareForm = document.getElementById("compare-form");
  if (compareForm) {
    var boxes = Array.prototype.slice.call(document.querySelectorAll("input[name=c][form=compare-form]"));
    var note = document.getElementById("compare-note");
    var go = document.getElementById("compare-go");
    var order = [];
    var sync = function () {
      go.disabled = order.length !== 2;
      note.textContent = order.length === 0 ? "Tick two images to compare them side by side."
        : order.length === 1 ? "#" + order[0].value + " ticked; tick one more."
        : "Compare #" + order[0].value + " and #" + order[1].value + ".";
      compareForm.classList.toggle("ready", order.length === 2);
    };
    boxes.forEach(function (box) {
      if (box.checked) order.push(box);
      box.addEventListener("change", function () {
        order = order.filter(function (b) { return b !== box; });
        if (box.checked) {
          order.push(box);
          if (order.length > 2) order.shift().checked = false;
        }
        sync();
      });
    });
    sync();
  }

  var input = document.getElementById("top_k");
  var warning = document.getElementById("low-vote-warning");
  var list = document.getElementById("low-vote-list");
  var ranking = document.getElementById("ranking");
  if (!input || !warning || !list || !ranking) return;
  var threshold = parseInt(warning.dataset.threshold, 10) || 5;
  function update() {
    var k = parseInt(input.value, 10);
    if (!(k >= 1)) return;
    var low = [];
    Array.prototype.slice.call(ranking.children, 0, k).forEach(function (li) {
      if (parseInt(li.dataset.votes, 10) < threshold) low.push("#" + li.dataset.candidateId);
    });
    list.textContent = low.join(", ");
    warning.hidden = low.length === 0;
  }
  input.addEventListener("input", update);
})();
