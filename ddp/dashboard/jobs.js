/* ddp-train dashboard: the training service's jobs table.
 *
 * One row per job of the service's /status (id, name, state, progress, loss, ETA, workers),
 * the job whose charts the page shows marked. A click on a row, or Enter or Space on a
 * focused one, asks for that job. Every string from the server goes into the page as text,
 * never as markup: job names come from users.
 *
 * window.ddpJobs.create({tbody, onSelect, fmt}) → {render(rows, shownId)}; fmt brings the
 * page's formatting: isNum, int, loss, duration and cell(tr, text, className).
 */
(function () {
  "use strict";

  var COLUMNS = 7;

  function create(opts) {
    var tbody = opts.tbody, fmt = opts.fmt;

    function choose(ev) {
      var tr = ev.target && ev.target.closest ? ev.target.closest("tr[data-job]") : null;
      if (!tr) return;
      if (ev.type === "keydown") {
        if (ev.key !== "Enter" && ev.key !== " ") return;
        ev.preventDefault();
      }
      opts.onSelect(tr.dataset.job);
    }
    tbody.addEventListener("click", choose);
    tbody.addEventListener("keydown", choose);

    function progress(row) {
      if (!fmt.isNum(row.step)) return "–";
      if (!fmt.isNum(row.total_steps) || row.total_steps <= 0) return fmt.int(row.step);
      var pct = Math.min(100, 100 * row.step / row.total_steps);
      return fmt.int(row.step) + " / " + fmt.int(row.total_steps) + " (" + pct.toFixed(1) + "%)";
    }

    function jobRow(row, shown) {
      var id = String(row.id), state = row.state == null ? "" : String(row.state);
      var tr = document.createElement("tr");
      tr.dataset.job = id;
      tr.tabIndex = 0;
      tr.className = "job" + (id === shown ? " selected" : "");
      tr.setAttribute("aria-selected", id === shown ? "true" : "false");
      if (row.message) tr.title = String(row.message);
      fmt.cell(tr, id, "jid");
      fmt.cell(tr, row.name == null ? "" : String(row.name), "jname");
      fmt.cell(tr, state || "–", "jstate");
      tr.lastChild.dataset.state = state;
      fmt.cell(tr, progress(row), "num");
      fmt.cell(tr, fmt.loss(row.loss), "num");
      fmt.cell(tr, state === "running" ? fmt.duration(row.eta_seconds) : "–", "num");
      fmt.cell(tr, fmt.isNum(row.workers) ? String(row.workers) : "–", "num");
      return tr;
    }

    // rows: the service's jobs; shown: the id of the job the page shows (or null)
    function render(rows, shown) {
      var focused = document.activeElement && tbody.contains(document.activeElement)
        ? document.activeElement.dataset.job : null;
      var frag = document.createDocumentFragment();
      if (!rows.length) {
        var tr = document.createElement("tr");
        tr.className = "empty";
        var td = document.createElement("td");
        td.colSpan = COLUMNS;
        td.textContent = "no jobs yet: ddp-job submit adds one";
        tr.appendChild(td);
        frag.appendChild(tr);
      }
      rows.forEach(function (row) { frag.appendChild(jobRow(row, shown)); });
      tbody.replaceChildren(frag);
      if (focused != null) {    // the rows are new: keep the keyboard where it was
        var again = [].find.call(tbody.rows, function (r) { return r.dataset.job === focused; });
        if (again) again.focus();
      }
    }

    return { render: render };
  }

  window.ddpJobs = { create: create };
})();
