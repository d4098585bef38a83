// The queue's new alerts without a reload: every few seconds the rows are fetched again
// (server-rendered and escaped like the page) and swapped in, unless the reviewer has
// ticked a row or is typing, so a poll never throws away a selection.
(function () {
  "use strict";
  var rows = document.getElementById("queue-rows");
  if (!rows) { return; }
  var url = rows.getAttribute("data-poll");
  var seconds = parseInt(rows.getAttribute("data-poll-s"), 10) || 15;
  var updated = document.getElementById("queue-updated");
  function busy() {
    var active = document.activeElement;
    if (active && (active.tagName === "INPUT" || active.tagName === "TEXTAREA" || active.tagName === "SELECT")) {
      return true;
    }
    return rows.querySelector("input[type=checkbox]:checked") !== null;
  }
  function poll() {
    if (busy()) { return; }
    fetch(url, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (answer) {
        if (!answer.ok) { throw new Error(String(answer.status)); }
        return answer.text();
      })
      .then(function (html) {
        if (busy()) { return; }
        var fresh = document.createElement("tbody");
        fresh.innerHTML = html;
        if (fresh.innerHTML !== rows.innerHTML) {
          rows.innerHTML = fresh.innerHTML;
        }
        if (updated) { updated.textContent = "Updated " + new Date().toLocaleTimeString() + ". "; }
      })
      .catch(function () {
        if (updated) { updated.textContent = "Cannot reach the console; retrying. "; }
      });
  }
  window.setInterval(poll, seconds * 1000);
})();
