"""What a run shows while it trains: Prometheus metrics, /healthz, /status, a live
dashboard, a JSON-lines record and, at the end, a push to a Pushgateway.

One `Monitor` lives where a run is decided (MPI rank 0, the ZeroMQ coordinator).
The training loop tells it what happened and it records that in a `RunState`
(`state.py`): a few additions under a lock, so a step costs the same whether anyone
looks or not. The views are built from the state when read: the Prometheus collector
(`prometheus.py`), /status and /api/history (`views.py`), served read-only by one HTTP
thread (`server.py`); the JSON-lines record (`jsonl.py`) is written as things happen.

The training service runs many jobs: one `ServiceMonitor` (`service.py`) keeps a Monitor
per job, the jobs table and the worker pool (`jobs.py`), and serves them all on one port,
each job's metrics labelled job="<id>".
"""
from .jobs import JOB_STATES, MAX_FINISHED
from .monitor import DEFAULT_PORT, Monitor, open_monitor
from .service import ServiceMonitor
from .state import BUCKETS, REJECT_REASONS, STATES, RunState, StepTotals

__all__ = ["BUCKETS", "DEFAULT_PORT", "JOB_STATES", "MAX_FINISHED", "REJECT_REASONS", "STATES",
           "Monitor", "RunState", "ServiceMonitor", "StepTotals", "open_monitor"]
