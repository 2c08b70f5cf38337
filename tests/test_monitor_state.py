"""The monitor's recorded state and its views, in process, without an HTTP server:
the step accumulator, the windows and history points, the workers, the Prometheus
collector built from a state, the JSON-lines record. (Served over real HTTP, and in
real runs: test_monitor.py.)"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ddp.monitor import REJECT_REASONS, STATES, RunState, StepTotals, prometheus, views
from ddp.monitor.jsonl import JsonlRecord
from ddp.monitor.state import MAX_DEPARTED, MAX_POINTS, History


def new_state(classify: bool = True, total_steps: int = 100) -> RunState:
    run = RunState(backend="zmq", total_steps=total_steps, layers=(4, 8, 3), parameters=67,
                   lr=0.05, classify=classify)
    run.start(0, steps_per_epoch=10, n_workers=2)
    return run


def scrape(run: RunState) -> dict:
    """{sample name with its labels: value} from the collector, as /metrics encodes it."""
    text = generate_latest(prometheus.registry(run)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


# --- the accumulator ---------------------------------------------------------------------


def test_step_totals_are_sums_and_means_per_sample_and_per_step():
    t = StepTotals()
    assert (t.steps, t.n, t.mean_loss, t.accuracy, t.step_seconds) == (0, 0, None, None, None)
    t.add(10, loss_sum=5.0, correct=4, t_step=0.010, t_compute=0.008, t_exchange=0.002)
    t.add(30, loss_sum=3.0, correct=30, t_step=0.030, t_compute=0.020, t_exchange=0.010)
    assert (t.steps, t.n, t.loss_sum, t.correct) == (2, 40, 8.0, 34)
    # loss and accuracy are per sample (a big batch weighs more), times per step
    assert t.mean_loss == 8.0 / 40 and t.accuracy == 34 / 40
    assert t.step_seconds == pytest.approx(0.02) and t.compute_seconds == pytest.approx(0.014)
    assert t.exchange_seconds == pytest.approx(0.006)
    t.reset()
    assert (t.steps, t.n, t.loss_sum, t.t_exchange, t.mean_loss, t.exchange_seconds) == \
        (0, 0, 0.0, 0.0, None, None)


# --- windows and history --------------------------------------------------------------------


def test_history_points_are_means_over_a_window():
    run = new_state()
    run.step_done(1, 10, 5.0, 4, 0.01, 0.008, 0.002)     # the first step closes a window at once
    run.step_done(2, 20, 2.0, 10, 0.02, 0.01, 0.004)     # within the second: summed, not shown
    assert len(run.history.train) == 1 and run.train_loss == 0.5
    run.window.start -= 10                               # the second is over: the next step closes it
    run.step_done(3, 30, 3.0, 30, 0.03, 0.02, 0.008)
    points = views.history(run, 0)["train"]
    assert [(p["step"], p["loss"], p["accuracy"]) for p in points] == [(1, 0.5, 0.4), (3, 0.1, 0.8)]
    assert points[1]["step_seconds"] == pytest.approx(0.025)
    assert points[1]["exchange_seconds"] == pytest.approx(0.006)
    assert run.train_loss == 0.1 and run.totals.steps == 3 and run.totals.n == 60
    run.step_done(100, 4, 4.0, 0, 0.01, 0.01, 0.0)        # the last step closes its window too
    assert views.history(run, points[1]["seq"])["train"][0]["step"] == 100


def test_regression_has_no_accuracy_anywhere():
    run = new_state(classify=False)
    run.step_done(1, 10, 5.0, 0, 0.01, 0.008, 0.002)
    run.evaluated(1, 0.4, None)
    assert views.status(run)["accuracy"] is None
    assert views.history(run, 0)["train"][0]["accuracy"] is None
    names = {name for name, _ in scrape(run)}
    assert "ddp_train_loss" in names and "ddp_train_accuracy" not in names
    assert "ddp_val_accuracy" not in names


def test_history_keeps_the_whole_run_at_a_coarser_grain():
    h = History()
    for step in range(1, 3 * MAX_POINTS + 1):
        h.add(h.train, {"step": step})
    steps = [p["step"] for p in h.train]
    assert len(steps) <= MAX_POINTS and steps[0] == 1 and steps[-1] == 3 * MAX_POINTS
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert [p["seq"] for p in h.train] == steps  # one sequence: a point keeps its number
    assert [p["step"] for p in h.since(steps[-3])["train"]] == steps[-2:]


def test_non_finite_values_are_null_in_the_json_views():
    run = new_state()
    run.step_done(1, 10, math.inf, 4, 0.01, 0.008, 0.002)
    run.evaluated(1, math.nan, 0.5)
    status, history = views.status(run), views.history(run, 0)
    json.dumps([status, history], allow_nan=False)  # what the server sends must be valid JSON
    assert status["loss"] is None and status["val_loss"] is None and status["val_accuracy"] == 0.5
    assert history["train"][0]["loss"] is None and history["val"][0]["val_loss"] is None


# --- the run's end ---------------------------------------------------------------------------


@pytest.mark.parametrize("exit_code,summary,state", [
    (0, {"interrupted": False, "val_loss": 0.25, "val_accuracy": 0.9}, "done"),
    (143, {"interrupted": True, "val_loss": None, "val_accuracy": None}, "interrupted"),
    (3, None, "failed"),
])
def test_the_end_state(exit_code, summary, state):
    run = new_state()
    run.evaluated(50, 0.5, 0.5)
    assert run.ended(exit_code, summary) == state
    assert views.status(run)["state"] == state
    assert scrape(run)[("ddp_state", (("state", state),))] == 1
    assert views.status(run)["val_loss"] == (0.25 if state == "done" else 0.5)  # the final evaluation


def test_a_stall_is_unhealthy_only_while_running():
    run = new_state()
    run.last_progress -= 100
    ok, text = views.health(run, stall_timeout=60)
    assert not ok and text.startswith("stalled: no step completed for 100 s")
    run.set_state("waiting-for-workers")
    assert views.health(run, stall_timeout=60) == (True, "ok: waiting-for-workers at step 0/100")


# --- workers ---------------------------------------------------------------------------------


def test_workers_that_leave_are_listed_after_the_active_ones_newest_first():
    run = new_state()
    w = run.workers
    for i in range(MAX_DEPARTED + 3):
        w.joined(f"worker {i}", step=0)
    w.report("worker 0", 7, 0.25)
    for i in range(1, MAX_DEPARTED + 3):
        w.left(f"worker {i}", lost=i % 2 == 0)
    listed = views.status(run)["worker_list"]
    assert listed[0]["name"] == "worker 0" and listed[0]["state"] == "active"
    assert listed[0]["last_step"] == 7 and listed[0]["compute_seconds"] == 0.25
    gone = [x["name"] for x in listed[1:]]
    assert gone == [f"worker {i}" for i in range(MAX_DEPARTED + 2, 2, -1)]  # the last 32, newest first
    assert listed[1]["state"] == "lost" and listed[2]["state"] == "left"
    assert (w.joins, w.failures) == (MAX_DEPARTED + 3, (MAX_DEPARTED + 2) // 2)


# --- the Prometheus collector, from a state alone ----------------------------------------------


def test_the_collector_shows_the_recorded_state():
    run = new_state()
    for step in range(1, 6):
        run.step_done(step, 32, 32 / step, 16, 0.002 * step, 0.0015 * step, 0.0005 * step)
    run.grad_norm = 1.5
    run.workers.joined("worker 1", 0)
    run.workers.joined("worker 2", 0)
    run.workers.report("worker 1", 5, 0.003)
    run.workers.left("worker 2", lost=True)
    run.workers.rejected["stale"] += 2
    run.workers.shard_timeouts += 1
    m = scrape(run)
    assert m[("ddp_train_steps_total", ())] == 5 and m[("ddp_train_samples_total", ())] == 160
    assert m[("ddp_grad_norm", ())] == 1.5 and m[("ddp_epoch", ())] == 0.5
    assert m[("ddp_worker_last_step", (("worker", "worker 1"),))] == 5
    assert ("ddp_worker_last_step", (("worker", "worker 2"),)) not in m  # it left the gauges
    assert m[("ddp_worker_failures_total", ())] == 1 and m[("ddp_worker_joins_total", ())] == 2
    assert m[("ddp_shard_timeouts_total", ())] == 1
    assert m[("ddp_rejected_messages_total", (("reason", "stale"),))] == 2
    assert sum(v for (name, _), v in m.items() if name == "ddp_rejected_messages_total") == 2
    assert len([k for k in m if k[0] == "ddp_rejected_messages_total"]) == len(REJECT_REASONS)
    assert sum(m[("ddp_state", (("state", s),))] for s in STATES) == 1
    # the exchange histogram keeps its metric name: ddp_allreduce_duration_seconds
    assert m[("ddp_allreduce_duration_seconds_count", ())] == 5
    assert m[("ddp_allreduce_duration_seconds_sum", ())] == pytest.approx(0.0005 * 15)
    assert m[("ddp_allreduce_duration_seconds_bucket", (("le", "0.001"),))] == 2  # 0.0005, 0.001
    assert m[("ddp_compute_duration_seconds_bucket", (("le", "+Inf"),))] == 5
    assert ("ddp_last_checkpoint_timestamp_seconds", ()) not in m
    run.checkpointed(5)
    assert m[("ddp_start_time_seconds", ())] <= scrape(run)[("ddp_last_checkpoint_timestamp_seconds", ())]


# --- the JSON-lines record ---------------------------------------------------------------------


def test_the_record_writes_json_with_null_for_non_finite_and_stops_at_a_failed_write(tmp_path):
    path, warnings = tmp_path / "run.jsonl", []
    record = JsonlRecord(str(path), warnings.append)
    record.write("step", step=1, loss=np.float32(0.5), val_loss=math.nan, where=tmp_path)
    looped: list = []
    looped.append(looped)             # json.dumps refuses it: the write fails
    record.write("bad", fields=looped)
    record.write("step", step=2)      # no more records after a failure
    record.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["event"] == "step" and lines[0]["step"] == 1
    assert lines[0]["loss"] == 0.5 and lines[0]["val_loss"] is None and lines[0]["where"] == str(tmp_path)
    assert len(warnings) == 1 and warnings[0].startswith(f"--log-jsonl {path}: cannot write")
