"""The compute side of a ZeroMQ worker: the job's data and model, and the thread that
sums gradients over the rows of each task while the main thread keeps the socket.

Results go back through a queue; an inproc PAIR socket wakes the main thread's
poll when one is ready. Gradient buffers are sent zero-copy, so one is reused
only after libzmq has sent it.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict

import numpy as np
import zmq

from ddp import data as ddata
from ddp import protocol
from ddp.config import config_from_job
from ddp.model import quiet_float_warnings
from ddp.setup import assemble, prepare

from .compute import ShardCompute

CHUNK_ROWS = 4096       # rows per forward/backward pass (without --micro-batch); larger
                        # shards are summed in passes
CACHED_DATASETS = 3     # data sets a worker keeps for the next jobs on the same data
# beside the fingerprint of the training rows (which covers the file, the split and the
# standardization), the job keys that decide how the rows were read and checked
LOAD_KEYS = ("loss", "dtype")


class DataCache:
    """The last few training sets this worker loaded, by the coordinator's fingerprint of
    them and the keys that load them: a job on the same data does not load it again,
    and a file that changed since (another fingerprint) is loaded anew."""

    def __init__(self, size: int = CACHED_DATASETS):
        self.size = size
        self.entries: OrderedDict = OrderedDict()  # key → (train, mean, std, fingerprint)

    @staticmethod
    def key(fingerprint: str, cfg) -> tuple:
        return (fingerprint, *(getattr(cfg, k) for k in LOAD_KEYS), cfg.layers[0], cfg.layers[-1])

    def get(self, key: tuple):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: tuple, setup) -> None:
        self.entries[key] = (setup.train, setup.mean, setup.std, setup.fingerprint())
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class Job:
    """The data and model of one job, loaded once (or taken from `cache`); kept across
    reconnects."""

    def __init__(self, description: dict, cache: DataCache | None = None, fingerprint: str = ""):
        cfg = config_from_job(description)
        key = DataCache.key(fingerprint, cfg) if cache is not None and cfg.layers else None
        cached = cache.get(key) if key is not None else None
        self.reused = cached is not None
        if cached is not None:
            train, mean, std, known = cached
            setup = assemble(cfg, train, None, mean, std)
            setup._fingerprint = known
        else:
            setup = prepare(cfg)
            if key is not None:
                cache.put(key, setup)
        self.description, self.cfg, self.layout = description, setup.cfg, setup.layout
        self.dtype = np.dtype(setup.cfg.dtype)
        self.schedule = setup.schedule
        self.n_samples = len(setup.train)
        self.max_rows = max(1, min(setup.cfg.batch_size, self.n_samples,
                                   setup.cfg.micro_batch or CHUNK_ROWS))
        self.reader = ddata.BatchReader(setup.train, self.schedule, self.max_rows, self.dtype,
                                        setup.mean, setup.std)
        self.compute = ShardCompute(self.layout, setup.cfg.activation, setup.cfg.loss, self.dtype,
                                    self.max_rows, setup.cfg.dropout, setup.cfg.seed)
        self.fingerprint = setup.fingerprint()
        self.buffers = GradBuffers(self.layout.size, self.dtype)
        self.scratch = np.empty(self.layout.size, self.dtype)


class GradBuffers:
    """Gradient buffers sent zero-copy: one is reused only after libzmq has sent it."""

    def __init__(self, size: int, dtype):
        self.size, self.dtype = size, protocol.wire_dtype(dtype)
        self.entries: list[list] = []  # [buffer, busy, tracker]
        self.lock = threading.Lock()

    def take(self) -> list:
        with self.lock:
            for entry in self.entries:
                if not entry[1] or (entry[2] is not None and entry[2].done):
                    entry[1], entry[2] = True, None
                    return entry
            entry = [np.empty(self.size, self.dtype), True, None]
            if len(self.entries) < 3:
                self.entries.append(entry)
            return entry


class ComputeThread(threading.Thread):
    """Σ gradients over rows [lo, hi) of a step's batch, one task after another.

    Tasks are (generation, task message, parameters, job); each result is (generation,
    message, loss sum, correct count, weight sum, buffer entry, seconds). `wake` is the caller's
    end of an inproc pair, bound here in the caller's thread: it is readable when a
    result is ready, so the caller polls it beside its other sockets.
    """

    def __init__(self, ctx: zmq.Context):
        super().__init__(name="ddp-compute", daemon=True)
        self.ctx = ctx
        self.wake_endpoint = f"inproc://wake-{id(self)}"
        self.wake = ctx.socket(zmq.PAIR)
        self.wake.bind(self.wake_endpoint)
        self.tasks: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()

    def drop_tasks(self) -> None:
        """Forget the tasks not started yet (they were for an earlier connection or job)."""
        while not self.tasks.empty():
            try:
                self.tasks.get_nowait()
            except queue.Empty:
                break
            self.tasks.task_done()

    def idle(self) -> bool:
        """No task waits or is being computed (only the caller's thread adds tasks, so
        this stays true until it adds one)."""
        return self.tasks.unfinished_tasks == 0

    def finished(self):
        """The results ready since the last call, oldest first (called in the polling thread)."""
        while self.wake.poll(0):
            self.wake.recv()
        while True:
            try:
                yield self.results.get_nowait()
            except queue.Empty:
                return

    def stop(self) -> None:
        self.tasks.put(None)

    def close(self, timeout: float) -> bool:
        """Close the wake socket and wait up to `timeout` s for the thread; True if it ended."""
        self.wake.close(linger=0)
        self.join(timeout=timeout)
        return not self.is_alive()

    def run(self) -> None:
        quiet_float_warnings()  # per thread: numpy's error state is thread-local
        wake = self.ctx.socket(zmq.PAIR)
        wake.connect(self.wake_endpoint)
        try:
            while True:
                item = self.tasks.get()
                if item is None:
                    return
                generation, msg, params, job = item
                started = time.perf_counter()
                loss, correct, weight, entry = self._compute(job, msg, params)
                self.results.put((generation, msg, loss, correct, weight, entry,
                                  time.perf_counter() - started))
                self.tasks.task_done()
                wake.send(b"")
        finally:
            wake.close(linger=0)

    def _compute(self, job: Job, msg: dict, params: np.ndarray):
        step, lo, hi = msg["step"], msg["lo"], msg["hi"]
        entry = job.buffers.take()
        layout = job.layout
        loss, correct, weight = job.compute.batch_sums_(
            layout.views(params), layout.views(entry[0]), layout.views(job.scratch), job.reader,
            step, lo, hi)
        return loss, correct, weight, entry
