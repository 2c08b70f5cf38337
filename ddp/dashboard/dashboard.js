/* ddp-train dashboard.
 *
 * Polls /status and /api/history?after=<seq> every 2 s while the run goes on, keeps the
 * points it has (each poll brings only the new ones), and draws them with uPlot (vendored
 * under /static/vendor). When the run is done, interrupted or failed it stops polling and
 * shows the final state; when the server is gone it keeps the last data, says so, and keeps
 * retrying (less often) in case a new run starts on the same port.
 *
 * The training service's /status lists jobs instead: the page shows them in a table
 * (jobs.js) and one job's run as above, from /status?job=ID and /api/history?job=ID: the
 * job clicked in the table, else the first running one. It polls as long as the service
 * answers.
 *
 * For tests: window.ddpDashboard exposes the charts and point counts, and every chart's
 * container carries data-points="<number of x values>" after each update.
 */
(function () {
  "use strict";

  var POLL_MS = 2000;
  var RETRY_MAX_MS = 10000;
  var FETCH_TIMEOUT_MS = 5000;
  var MAX_POINTS = 4000;        // per series kept in the page; older ones are thinned beyond
  var CHART_HEIGHT = 210;
  var STALL_WARN_S = 30;
  var STALE_REPORT_S = 10;
  var REPORT_EVERY_S = 0.5;     // MPI ranks report twice a second (ZeroMQ workers every step)
  var REPORT_OVERDUE_S = 2;     // four reports missed: the worker's step is worth showing
  // a run's end (done, interrupted, failed), and that of a job of the service
  var TERMINAL = { done: true, interrupted: true, failed: true, diverged: true, cancelled: true };

  var COLORS = {
    train: "#2563eb",
    val: "#e8590c",
    sps: "#0f766e",
    compute: "#2563eb",
    exchange: "#e8590c",
    step: "#57606a"
  };

  // ------------------------------------------------------------------ state

  var S = {
    train: [],          // history train points, sorted by step
    val: [],            // history val points, sorted by step
    lastSeq: null,      // newest seq received; null: ask for everything
    runKey: null,       // the job and status.started of the run whose points we hold
    service: null,      // the training service's last /status (its jobs); null: a run's port
    jobId: null,        // the service's job whose run is shown
    chosen: null,       // the job clicked in the table: shown while the service lists it
    inFlight: false,    // a poll is under way
    pollAgain: false,   // poll once more as soon as it ends (a job was clicked meanwhile)
    status: null,       // last /status
    state: null,        // last known run state
    serverOffset: 0,    // server clock minus client clock, seconds
    fetchedAt: null,    // server time of the last successful poll (unix s)
    connected: false,
    everConnected: false,
    failures: 0,
    polling: true,
    hasAccuracy: false,
    logLoss: true,      // the loss chart's y scale: log unless turned off on the page (remembered)
    timer: null,
    lastUpdate: null
  };

  var charts = { loss: null, accuracy: null, throughput: null, steptime: null };
  var jobsTable = null;

  // ------------------------------------------------------------------ formatting

  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function fmtInt(v) { return isNum(v) ? Math.round(v).toLocaleString("en-US") : "–"; }
  function fmtLoss(v) {
    if (!isNum(v)) return "–";
    if (v !== 0 && Math.abs(v) < 0.001) return v.toExponential(2);
    return v.toPrecision(4);
  }
  function fmtPct(v) { return isNum(v) ? (v * 100).toFixed(2) + "%" : "–"; }
  function fmtMs(v) {
    if (!isNum(v)) return "–";
    var ms = v * 1000;
    return (ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2)) + " ms";
  }
  function fmtEpoch(v) {
    if (!isNum(v)) return "–";
    return v >= 100 ? v.toFixed(0) : v.toFixed(2);
  }
  function fmtCompact(v) {
    if (!isNum(v)) return "";
    var a = Math.abs(v);
    if (a >= 1e9) return +(v / 1e9).toPrecision(3) + "G";
    if (a >= 1e6) return +(v / 1e6).toPrecision(3) + "M";
    if (a >= 1e4) return +(v / 1e3).toPrecision(3) + "k";
    if (a >= 1) return String(+v.toPrecision(4));
    if (a === 0) return "0";
    if (a < 0.001) return v.toExponential(0).replace("e-", "e−");
    return String(+v.toPrecision(3));
  }
  function fmtDuration(s) {
    if (!isNum(s) || s < 0) return "–";
    if (s < 10) return s.toFixed(1) + " s";
    s = Math.round(s);
    if (s < 60) return s + " s";
    var m = Math.floor(s / 60), h = Math.floor(m / 60);
    if (h === 0) return m + " min " + (s % 60) + " s";
    var d = Math.floor(h / 24);
    if (d === 0) return h + " h " + pad2(m % 60) + " min";
    return d + " d " + (h % 24) + " h";
  }
  function pad2(n) { return (n < 10 ? "0" : "") + n; }
  function clock(unix) {
    var d = new Date(unix * 1000);
    return pad2(d.getHours()) + ":" + pad2(d.getMinutes()) + ":" + pad2(d.getSeconds());
  }
  function serverNow() { return Date.now() / 1000 + S.serverOffset; }

  function $(id) { return document.getElementById(id); }
  function setText(id, text) {
    var el = $(id);
    if (el.textContent !== text) el.textContent = text;
  }

  // ------------------------------------------------------------------ charts

  function axisValues(fmt) {
    return function (u, splits) { return splits.map(function (v) { return v == null ? "" : fmt(v); }); };
  }

  // the legend shows the hovered point, or the newest one when the cursor is elsewhere
  function legendValue(fmt) {
    return function (u, v, si, i) {
      if (i == null) v = lastValue(u.data[si]);
      return v == null ? "–" : fmt(v);
    };
  }

  function lastValue(arr) {
    if (!arr) return null;
    for (var k = arr.length - 1; k >= 0; k--) if (arr[k] != null) return arr[k];
    return null;
  }

  function makeChart(el, opts) {
    var width = Math.max(200, el.clientWidth || 400);
    var base = {
      width: width,
      height: CHART_HEIGHT,
      scales: { x: { time: false } },
      legend: { live: true },
      cursor: {
        sync: { key: "ddp" },
        drag: { x: true, y: false },
        points: { size: 6 }
      },
      axes: [
        { values: axisValues(fmtCompact), stroke: "#57606a", grid: { stroke: "#eaeef2" },
          ticks: { stroke: "#d8dee4" } },
        { values: axisValues(opts.yFmt || fmtCompact), size: 52, stroke: "#57606a",
          grid: { stroke: "#eaeef2" }, ticks: { stroke: "#d8dee4" } }
      ],
      series: [{ label: "step", value: legendValue(fmtInt) }].concat(opts.series)
    };
    if (opts.y) base.scales.y = opts.y;
    if (opts.yFilter) {
      base.axes[1].filter = opts.yFilter;
      base.axes[1].grid.filter = opts.yFilter;
      base.axes[1].ticks.filter = opts.yFilter;
    }
    if (opts.bands) base.bands = opts.bands;
    var empty = [[]];
    for (var i = 0; i < opts.series.length; i++) empty.push([]);
    // a drag-selection zooms in (x) and holds the view while points arrive;
    // a double-click goes back to following the whole run
    base.hooks = { setSelect: [function (self) { if (self.select.width > 2) self.zoomed = true; }] };
    var u = new uPlot(base, empty, el);
    u.zoomed = false;
    u.lastWidth = width;
    u.over.addEventListener("dblclick", function () { u.zoomed = false; });
    el.dataset.points = "0";
    return u;
  }

  function setChartData(u, el, data) {
    u.setData(data, !u.zoomed);
    if (u.cursor.idx == null) u.setLegend();
    el.dataset.points = String(data[0].length);
  }

  function lineSeries(label, color, fmt, extra) {
    var s = { label: label, stroke: color, width: 1.5, value: legendValue(fmt), spanGaps: true,
              points: { show: false } };
    if (extra) for (var k in extra) s[k] = extra[k];
    return s;
  }

  // validation: dashed, with a dot per evaluation while they are not too dense
  function valSeries(label, fmt) {
    return lineSeries(label, COLORS.val, fmt, {
      width: 1.5, dash: [5, 3],
      points: {
        show: function (u, si) { return countValues(u.data[si]) <= 40; },
        size: 5, fill: COLORS.val, stroke: COLORS.val
      }
    });
  }

  function countValues(arr) {
    var n = 0;
    for (var k = 0; arr && k < arr.length; k++) if (arr[k] != null) n++;
    return n;
  }

  // log axis: ticks and grid at 1, 2, 5 × 10^k, or only at 10^k over more than two decades
  function logSplitsFilter(u, splits) {
    var min = u.scales.y.min, max = u.scales.y.max;
    var decades = min > 0 && max > 0 ? Math.log10(max / min) : 0;
    return splits.map(function (v) {
      if (!(v > 0)) return null;
      var m = +(v / Math.pow(10, Math.floor(Math.log10(v) + 1e-9))).toFixed(6);
      return m === 1 || (decades <= 2 && (m === 2 || m === 5)) ? v : null;
    });
  }

  function lossRange(u, min, max) {
    if (!isNum(min) || !isNum(max)) return [0, 1];
    var lo = Math.max(0, min - (max - min) * 0.05);
    if (min >= 0 && min < (max - min) * 0.25) lo = 0;
    return [lo, max + (max - min) * 0.05 || max + 0.1];
  }

  // log scale: from the nice value (1, 2, 5 × 10^k) at or below the smallest loss to the one
  // at or above the largest
  function logRange(u, min, max) {
    if (!(min > 0) || !(max > 0)) return [0.01, 1];
    return [nice(min, false), nice(max, true)];
  }

  function nice(v, up) {
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = up ? [1, 2, 5, 10] : [10, 5, 2, 1];
    for (var k = 0; k < steps.length; k++) {
      var c = +(steps[k] * p).toPrecision(6);
      if (up ? c >= v * (1 - 1e-9) : c <= v * (1 + 1e-9)) return c;
    }
    return up ? 10 * p : p;
  }

  function createLossChart() {
    if (charts.loss) charts.loss.destroy();
    charts.loss = makeChart($("chart-loss"), {
      series: [lineSeries("train loss", COLORS.train, fmtLoss), valSeries("val loss", fmtLoss)],
      y: S.logLoss ? { distr: 3, log: 10, range: logRange } : { range: lossRange },
      yFilter: S.logLoss ? logSplitsFilter : null,
      yFmt: fmtCompact
    });
  }

  function createCharts() {
    createLossChart();
    charts.throughput = makeChart($("chart-throughput"), {
      series: [lineSeries("samples/s", COLORS.sps, fmtInt, { fill: "rgba(15,118,110,0.08)" })],
      y: { range: function (u, min, max) { return [0, isNum(max) && max > 0 ? max * 1.1 : 1]; } }
    });
    // stacked: series 1 = compute, series 2 = compute + communication (band between),
    // series 3 = the whole step; the legend shows each part's own value
    var raw = { exchange: [] };
    charts.steptime = makeChart($("chart-steptime"), {
      series: [
        lineSeries("compute", COLORS.compute, fmtMsVal, { fill: "rgba(37,99,235,0.18)" }),
        lineSeries("comm", COLORS.exchange, fmtMsVal, {
          value: function (u, v, si, i) { return fmtMsVal(i == null ? lastValue(raw.exchange) : raw.exchange[i]); }
        }),
        lineSeries("total", COLORS.step, fmtMsVal, { width: 1, dash: [3, 3] })
      ],
      bands: [{ series: [2, 1], fill: "rgba(232,89,12,0.22)" }],
      y: { range: function (u, min, max) { return [0, isNum(max) && max > 0 ? max * 1.15 : 1]; } },
      yFmt: function (v) { return fmtCompact(v); }
    });
    charts.steptime.raw = raw;
  }

  function fmtMsVal(v) {   // values already in ms
    if (!isNum(v)) return "–";
    return (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(3)) + " ms";
  }

  function createAccuracyChart() {
    $("card-accuracy").hidden = false;
    charts.accuracy = makeChart($("chart-accuracy"), {
      series: [lineSeries("train accuracy", COLORS.train, fmtPct), valSeries("val accuracy", fmtPct)],
      y: { range: function (u, min, max) {
        if (!isNum(min)) return [0, 1];
        return [Math.max(0, Math.floor(min * 10) / 10 - 0.02), 1.005];
      } },
      yFmt: function (v) { return +(v * 100).toFixed(1) + "%"; }
    });
  }

  // train and val merged on one x axis (step): null where a series has no point
  function mergeByStep(trainKey, valKey) {
    var xs = [], a = [], b = [];
    var T = S.train, V = S.val, i = 0, j = 0;
    while (i < T.length || j < V.length) {
      var st = i < T.length ? T[i].step : Infinity;
      var sv = j < V.length ? V[j].step : Infinity;
      var x, av = null, bv = null;
      if (st < sv) { x = st; av = num(T[i][trainKey]); i++; }
      else if (sv < st) { x = sv; bv = num(V[j][valKey]); j++; }
      else { x = st; av = num(T[i][trainKey]); bv = num(V[j][valKey]); i++; j++; }
      var n = xs.length;
      if (n && xs[n - 1] === x) {       // same step twice: keep the newer values
        if (av != null) a[n - 1] = av;
        if (bv != null) b[n - 1] = bv;
      } else { xs.push(x); a.push(av); b.push(bv); }
    }
    return [xs, a, b];
  }

  function num(v) { return isNum(v) ? v : null; }
  function positive(v) { return v != null && v > 0 ? v : null; }

  function byStep(p, q) { return p.step - q.step || p.seq - q.seq; }

  function updateCharts() {
    S.train.sort(byStep);
    S.val.sort(byStep);
    if (!S.hasAccuracy) {
      S.hasAccuracy = S.train.some(function (p) { return isNum(p.accuracy); }) ||
        S.val.some(function (p) { return isNum(p.val_accuracy); }) ||
        !!(S.status && (isNum(S.status.accuracy) || isNum(S.status.val_accuracy)));
    }
    var loss = mergeByStep("loss", "val_loss");
    if (S.logLoss) loss = [loss[0], loss[1].map(positive), loss[2].map(positive)];
    setChartData(charts.loss, $("chart-loss"), loss);
    if (S.hasAccuracy) {
      if (!charts.accuracy) createAccuracyChart();
      setChartData(charts.accuracy, $("chart-accuracy"), mergeByStep("accuracy", "val_accuracy"));
    }
    var xs = [], sps = [], comp = [], stack = [], whole = [], exchange = [];
    S.train.forEach(function (p) {
      var n = xs.length;
      if (n && xs[n - 1] === p.step) { xs.pop(); sps.pop(); comp.pop(); stack.pop(); whole.pop(); exchange.pop(); }
      xs.push(p.step);
      sps.push(num(p.samples_per_second));
      var c = num(p.compute_seconds), m = num(p.exchange_seconds);
      comp.push(c == null ? null : c * 1000);
      exchange.push(m == null ? null : m * 1000);
      stack.push(c == null || m == null ? null : (c + m) * 1000);
      whole.push(isNum(p.step_seconds) ? p.step_seconds * 1000 : null);
    });
    setChartData(charts.throughput, $("chart-throughput"), [xs, sps]);
    charts.steptime.raw.exchange = exchange;
    setChartData(charts.steptime, $("chart-steptime"), [xs, comp, stack, whole]);
  }

  function resizeCharts() {
    Object.keys(charts).forEach(function (k) {
      var u = charts[k];
      if (!u) return;
      var w = Math.max(200, u.root.parentNode.clientWidth);
      if (w !== u.lastWidth) {
        u.lastWidth = w;
        u.setSize({ width: w, height: CHART_HEIGHT });
      }
    });
  }

  // ------------------------------------------------------------------ header, table, notice

  function renderHeader() {
    var st = S.status || {};
    var state = S.connected || (TERMINAL[S.state] && !S.service) ? S.state
      : (S.everConnected ? "disconnected" : "connecting");
    var badge = $("state");
    badge.dataset.state = state || "";
    setText("state", state || "connecting…");

    var meta = [];
    if (S.service && S.jobId != null) {
      meta.push("job " + S.jobId + (st.job && st.job.name ? " · " + String(st.job.name) : ""));
    }
    if (st.backend) meta.push(st.backend === "zmq" ? "ZeroMQ" : st.backend.toUpperCase());
    if (st.version) meta.push("v" + st.version);
    if (st.layers && st.layers.length) meta.push("layers " + st.layers.join("-"));
    if (isNum(st.parameters)) meta.push(fmtInt(st.parameters) + " parameters");
    setText("meta", meta.join(" · "));

    var step = st.step, total = st.total_steps;
    var pct = isNum(step) && isNum(total) && total > 0 ? Math.min(100, 100 * step / total) : 0;
    var bar = $("progress-bar");
    bar.style.width = pct.toFixed(2) + "%";
    bar.className = "progress-bar" + (S.state === "done" ? " done" : S.state === "interrupted" ? " stopped"
      : S.state === "failed" ? " failed" : "");
    bar.parentNode.setAttribute("aria-valuenow", pct.toFixed(1));
    setText("progress-text", isNum(step)
      ? "step " + fmtInt(step) + (isNum(total) ? " / " + fmtInt(total) + " (" + pct.toFixed(1) + "%)" : "")
      : "step –");

    setText("s-epoch", fmtEpoch(st.epoch));
    var wl = st.worker_list || [];
    setText("s-workers", isNum(st.workers)
      ? (wl.length > st.workers ? st.workers + " of " + wl.length : String(st.workers)) : "–");
    setText("s-sps", fmtInt(st.samples_per_second));
    setText("s-loss", fmtLoss(st.loss));
    setText("s-vloss", fmtLoss(st.val_loss));
    $("s-acc-box").hidden = !S.hasAccuracy;
    $("s-vacc-box").hidden = !S.hasAccuracy;
    setText("s-acc", fmtPct(st.accuracy));
    setText("s-vacc", fmtPct(st.val_accuracy));

    var now = S.fetchedAt || serverNow();
    if (isNum(st.last_checkpoint_step)) {
      var ago = isNum(st.last_checkpoint_time) ? " · " + fmtDuration(Math.max(0, now - st.last_checkpoint_time)) + " ago" : "";
      setText("s-ckpt", "step " + fmtInt(st.last_checkpoint_step) + ago);
    } else {
      setText("s-ckpt", S.status ? "none" : "–");
    }
    var end = st.job && isNum(st.job.ended) ? st.job.ended : now;   // a service's job that ended
    setText("s-elapsed", isNum(st.started) ? fmtDuration(Math.max(0, end - st.started)) : "–");
    var own = st.job && isNum(st.job.eta_seconds) ? fmtDuration(st.job.eta_seconds) : null;
    setText("s-eta", S.connected && !TERMINAL[S.state] ? own || eta(st) : "–");
  }

  // steps per second over the last ~30 s of train points (null before two points)
  function stepRate() {
    var T = S.train;
    if (T.length < 2) return null;
    var last = T[T.length - 1], first = last;
    for (var i = T.length - 2; i >= 0; i--) {
      first = T[i];
      if (last.t - first.t >= 30) break;
    }
    var dt = last.t - first.t, ds = last.step - first.step;
    return dt > 0 && ds > 0 ? ds / dt : null;
  }

  // remaining time from the step rate
  function eta(st) {
    var rate = stepRate();
    if (!rate || !isNum(st.step) || !isNum(st.total_steps)) return "–";
    return fmtDuration(Math.max(0, st.total_steps - st.step) / rate);
  }

  // How far a worker is behind the newest report, when that means something. Ranks report
  // every REPORT_EVERY_S (a report is skipped while the last is still on its way), so a
  // healthy one trails the newest by what the run does in up to two intervals (2,000 steps
  // at 2,000 steps/s): that is shown as 0. Shown as a number: a lag beyond it, or any lag
  // once the worker's reports are overdue. null: nothing known.
  function lagOf(w, newest, rate) {
    if (!isNum(w.last_step) || !isFinite(newest)) return null;
    var lag = Math.max(0, newest - w.last_step);
    var overdue = isNum(w.seconds_since_report) && w.seconds_since_report > REPORT_OVERDUE_S;
    var cadence = 1 + (isNum(rate) ? rate * 2 * REPORT_EVERY_S : 0);
    return overdue || lag > cadence ? lag : 0;
  }

  function renderWorkers() {
    var st = S.status;
    var list = (st && st.worker_list) || [];
    var tbody = $("workers").tBodies[0];
    var rows = document.createDocumentFragment();
    if (!list.length) {
      var tr0 = document.createElement("tr");
      tr0.className = "empty";
      var td0 = document.createElement("td");
      td0.colSpan = 6;
      td0.textContent = st ? "no workers yet" : S.service ? "no job to show" : "waiting for the server";
      tr0.appendChild(td0);
      rows.appendChild(tr0);
    } else {
      var newest = list.reduce(function (m, w) { return isNum(w.last_step) && w.last_step > m ? w.last_step : m; }, -Infinity);
      list = list.slice().sort(function (a, b) {
        return String(a.name).localeCompare(String(b.name), "en", { numeric: true });
      });
      var rate = stepRate();
      list.forEach(function (w) {
        var lag = lagOf(w, newest, rate);
        var tr = document.createElement("tr");
        // reports come every fraction of a second, so a small lag is their cadence; a
        // report older than STALE_REPORT_S from an active worker is worth a look
        var stale = w.state === "active" && isNum(w.seconds_since_report) && w.seconds_since_report > STALE_REPORT_S;
        tr.className = "w-" + (w.state || "unknown") + (stale ? " stale" : "");
        tr.dataset.worker = String(w.name);
        cell(tr, String(w.name));
        cell(tr, w.state || "–", "wstate " + (w.state || ""));
        cell(tr, fmtInt(w.last_step), "num");
        cell(tr, lag == null ? "–" : lag === 0 ? "0" : fmtInt(lag), "num lag");
        cell(tr, fmtMs(w.compute_seconds), "num");
        cell(tr, isNum(w.seconds_since_report) ? fmtDuration(w.seconds_since_report) : "–", "num since");
        rows.appendChild(tr);
      });
    }
    tbody.replaceChildren(rows);
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }

  function renderNotice() {
    var el = $("notice"), st = S.status || {}, text = "", cls = "notice";
    var where = isNum(st.step) ? " at step " + fmtInt(st.step) + (isNum(st.total_steps) ? " of " + fmtInt(st.total_steps) : "") : "";
    var subject = S.service && S.jobId != null ? "job " + S.jobId : "run";
    if (TERMINAL[S.state] && S.connected) {
      text = subject + " " + S.state + where + " — showing the final state";
      cls += S.state === "done" ? " final" : S.state === "failed" ? " error" : "";
    } else if (!S.connected && S.everConnected) {
      text = "disconnected — showing the final state (last seen: " + (S.state || "unknown") + where +
        "); the server no longer answers, retrying now and then";
      cls += " error";
    } else if (!S.connected && S.failures > 0) {
      text = "cannot reach the ddp-train server at " + location.host + " — retrying";
      cls += " error";
    } else if (S.state === "queued") {
      text = subject + " is queued";
    } else if (S.state === "waiting-for-workers") {
      text = "waiting for workers to join";
    } else if (S.state === "training" && isNum(st.seconds_since_step) && st.seconds_since_step > STALL_WARN_S) {
      text = "no step completed for " + fmtDuration(st.seconds_since_step);
    }
    el.className = cls;
    el.hidden = !text;
    if (el.textContent !== text) el.textContent = text;
  }

  function renderFooter() {
    var parts = [];
    if (S.lastUpdate) parts.push("updated " + clock(S.lastUpdate));
    parts.push(S.train.length + " train and " + S.val.length + " validation points");
    parts.push(S.polling ? (S.connected ? "refreshing every " + POLL_MS / 1000 + " s" : "retrying") : "polling stopped");
    setText("footer", parts.join(" · "));
  }

  function renderJobs() {
    $("jobs-card").hidden = !S.service || !jobsTable;
    if (!S.service || !jobsTable) return;
    jobsTable.render(S.service.jobs, S.chosen != null ? S.chosen : S.jobId);
    var sv = S.service.service || {}, by = sv.jobs_by_state || {};
    var parts = [fmtInt(by.running || 0) + " running", fmtInt(by.queued || 0) + " queued"];
    if (isNum(sv.pool_workers)) {
      parts.push(fmtInt(sv.pool_workers) + " workers" + (isNum(sv.idle_workers) ? ", " + fmtInt(sv.idle_workers) + " idle" : ""));
    }
    setText("jobs-summary", parts.join(" · "));
  }

  function render() {
    renderJobs();
    renderHeader();
    renderWorkers();
    renderNotice();
    renderFooter();
  }

  // ------------------------------------------------------------------ polling

  function fetchJSON(url) {
    var ctrl = new AbortController();
    var timer = setTimeout(function () { ctrl.abort(); }, FETCH_TIMEOUT_MS);
    return fetch(url, { cache: "no-store", signal: ctrl.signal, headers: { Accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) {
          var err = new Error(url + ": HTTP " + r.status);
          err.status = r.status;
          throw err;
        }
        var date = Date.parse(r.headers.get("Date") || "");
        return r.json().then(function (body) { return { body: body, date: date }; });
      })
      .finally(function () { clearTimeout(timer); });
  }

  function reset() {
    S.train = [];
    S.val = [];
    S.lastSeq = null;
    S.hasAccuracy = false;
    if (charts.accuracy) {
      charts.accuracy.destroy();
      charts.accuracy = null;
      $("card-accuracy").hidden = true;
      $("chart-accuracy").dataset.points = "0";
    }
  }

  // keep at most MAX_POINTS: drop every other point of the older half
  function thin(arr) {
    if (arr.length <= MAX_POINTS) return arr;
    var half = arr.length >> 1;
    return arr.slice(0, half).filter(function (p, i) { return i % 2 === 0; }).concat(arr.slice(half));
  }

  function ingest(h) {
    var after = S.lastSeq == null ? -Infinity : S.lastSeq;
    (h.train || []).forEach(function (p) { if (p.seq > after) S.train.push(p); });
    (h.val || []).forEach(function (p) { if (p.seq > after) S.val.push(p); });
    S.train = thin(S.train);
    S.val = thin(S.val);
    if (isNum(h.seq)) S.lastSeq = S.lastSeq == null ? h.seq : Math.max(S.lastSeq, h.seq);
  }

  function noteClock(date) {
    if (!isNum(date)) return;
    var offset = date / 1000 - Date.now() / 1000;
    // the Date header has 1 s resolution: trust the local clock when they agree that far
    S.serverOffset = Math.abs(offset) > 2 ? offset : 0;
  }

  function historyURL() {
    var q = [];
    if (S.jobId != null) q.push("job=" + encodeURIComponent(S.jobId));
    if (S.lastSeq != null) q.push("after=" + S.lastSeq);
    return "/api/history" + (q.length ? "?" + q.join("&") : "");
  }

  // the service's job to show: the one clicked while it is listed, else the one shown while
  // it runs, else the first running one, else the one shown, else the first
  function pickJob(rows) {
    var ids = rows.map(function (r) { return String(r.id); });
    var running = rows.filter(function (r) { return r.state === "running"; })
      .map(function (r) { return String(r.id); });
    if (S.chosen != null && ids.indexOf(S.chosen) >= 0) return S.chosen;
    S.chosen = null;
    if (running.indexOf(S.jobId) >= 0) return S.jobId;
    if (running.length) return running[0];
    if (ids.indexOf(S.jobId) >= 0) return S.jobId;
    return ids.length ? ids[0] : null;
  }

  // the service's /status in hand: the shown job's own status, or null when there is none
  async function jobStatus(service) {
    S.service = service;
    S.jobId = pickJob(service.jobs);
    if (S.jobId == null) return null;
    try {
      return (await fetchJSON("/status?job=" + encodeURIComponent(S.jobId))).body;
    } catch (err) {
      if (err.status !== 404) throw err;
      S.chosen = S.jobId = null;    // gone between the two requests: the next poll picks again
      return null;
    }
  }

  async function fetchRun(status) {
    var key = (S.jobId == null ? "" : S.jobId) + " " + status.started;
    if (S.runKey != null && key !== S.runKey) reset();   // a new run on this port, another job
    S.runKey = key;
    var h = await fetchJSON(historyURL());
    if (S.lastSeq != null && isNum(h.body.seq) && h.body.seq < S.lastSeq) {
      reset();
      h = await fetchJSON(historyURL());
    }
    ingest(h.body);
    return TERMINAL[h.body.state] && !TERMINAL[status.state] ? h.body.state : status.state;
  }

  async function poll() {
    S.timer = null;
    S.inFlight = true;
    try {
      var st = await fetchJSON("/status");
      noteClock(st.date);
      var status = st.body;
      if (Array.isArray(status.jobs)) {
        status = await jobStatus(status);
      } else {                      // a run's port (again, if a service had it before)
        S.service = S.jobId = S.chosen = null;
      }
      if (status) {
        S.state = await fetchRun(status);
      } else {                      // the service has no job to show
        if (S.runKey != null) reset();
        S.runKey = null;
        S.state = "idle";
      }
      S.status = status;
      S.connected = true;
      S.everConnected = true;
      S.failures = 0;
      S.fetchedAt = serverNow();
      S.lastUpdate = Date.now() / 1000;
      if (TERMINAL[S.state] && !S.service) S.polling = false;
      updateCharts();
    } catch (err) {
      S.connected = false;
      S.failures += 1;
      if (window.console) console.warn("ddp dashboard: poll failed:", err && err.message ? err.message : err);
    }
    S.inFlight = false;
    render();
    if (S.pollAgain) {
      S.pollAgain = false;
      poll();
    } else {
      schedule();
    }
  }

  // a job clicked in the table: shown from now on (at once if no poll is under way)
  function selectJob(id) {
    S.chosen = id;
    renderJobs();
    if (S.inFlight) {
      S.pollAgain = true;
      return;
    }
    if (S.timer) clearTimeout(S.timer);
    poll();
  }

  function schedule() {
    if (!S.polling || S.timer) return;
    var delay = S.failures ? Math.min(RETRY_MAX_MS, POLL_MS * Math.pow(2, S.failures - 1)) : POLL_MS;
    S.timer = setTimeout(poll, delay);
  }

  // ------------------------------------------------------------------ start

  function start() {
    try { S.logLoss = window.localStorage.getItem("ddp-dashboard-log-loss") !== "0"; } catch (e) { /* no storage */ }
    var box = $("loss-log");
    box.checked = S.logLoss;
    box.addEventListener("change", function () {
      S.logLoss = box.checked;
      try { window.localStorage.setItem("ddp-dashboard-log-loss", S.logLoss ? "1" : "0"); } catch (e) { /* no storage */ }
      createLossChart();
      updateCharts();
    });
    createCharts();
    if (window.ddpJobs) {
      jobsTable = window.ddpJobs.create({
        tbody: $("jobs").tBodies[0], onSelect: selectJob,
        fmt: { isNum: isNum, int: fmtInt, loss: fmtLoss, duration: fmtDuration, cell: cell }
      });
    }
    if (window.ResizeObserver) {
      var ro = new ResizeObserver(resizeCharts);
      document.querySelectorAll(".chart").forEach(function (el) { ro.observe(el); });
    } else {
      window.addEventListener("resize", resizeCharts);
    }
    render();
    poll();
  }

  window.ddpDashboard = {
    charts: charts,
    lagOf: lagOf,
    points: function () { return { train: S.train.length, val: S.val.length }; },
    state: function () { return S.state; },
    status: function () { return S.status; },
    connected: function () { return S.connected; },
    polling: function () { return S.polling; },
    lastSeq: function () { return S.lastSeq; },
    job: function () { return S.jobId; },
    service: function () { return S.service; }
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
