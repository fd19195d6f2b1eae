// The gallery: CI bars from data attributes (the CSP allows no inline style) and the low-vote
// warning kept in step with K as the reviewer changes it.
(function () {
  "use strict";
  document.querySelectorAll(".cibar").forEach(function (bar) {
    bar.querySelector("span").style.left = bar.dataset.left + "%";
    bar.querySelector("span").style.width = bar.dataset.width + "%";
    bar.querySelector("i").style.left = bar.dataset.mark + "%";
  });
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
