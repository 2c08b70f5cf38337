"""The training service's jobs on disk: one directory per job under STATE_DIR/jobs/.

    jobs/<id>/job.json       the job's record (state, times, exit code, message and the
                             submitted config), written atomically with a checksum
    jobs/<id>/config.toml    the resolved config it runs with
    jobs/<id>/checkpoints/   its checkpoints (a restarted service resumes the newest)
    jobs/<id>/model.npz, summary.json, log.jsonl

The queue is the set of records: a restarted service reads them all back. A record
whose file does not parse or whose checksum does not match is reported and kept as it
is (never overwritten); a directory with no record is a submission that was never
accepted (the client got no id), and is left alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field

from ddp import checkpoint as ckpt
from ddp.errors import OutputError, UsageError
from ddp.log import Log

FORMAT = "ddp-train job 1"
STATES = ("queued", "running", "done", "failed", "diverged", "cancelled")
ENDED = ("done", "failed", "diverged", "cancelled")
# what `ddp-job wait` exits with for a job that ended so (ddp.errors' codes)
EXIT_CODES = {"done": 0, "failed": 2, "diverged": 3, "cancelled": 130}


@dataclass
class JobRecord:
    """One job as the service keeps it (what job.json holds)."""

    id: str
    seq: int                    # submission order
    name: str
    priority: int
    values: dict                # the submitted ddp-train keys
    state: str = "queued"
    submitted: float = field(default_factory=time.time)
    started: float | None = None     # the last time it started running
    first_step: float | None = None  # when that start's first step went out
    last_step: float | None = None   # when its last step so far was applied
    ended: float | None = None
    exit_code: int | None = None
    message: str = ""
    queue_seconds: float | None = None
    step: int = 0               # progress when last written (the checkpoints hold the truth)
    total_steps: int | None = None
    loss: float | None = None   # the final loss and accuracy of a job that is done
    accuracy: float | None = None
    corrupt: bool = False       # its job.json could not be read: shown, never run or rewritten

    @property
    def ended_state(self) -> bool:
        return self.state in ENDED

    def order(self) -> tuple:
        """Queue order: higher priority first, then submission order."""
        return (-self.priority, self.seq)


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class JobStore:
    """The records under `root`/jobs, read back at start and written on every change."""

    def __init__(self, root: str, log: Log):
        self.root, self.log = root, log
        self.jobs_dir = os.path.join(root, "jobs")
        try:
            os.makedirs(self.jobs_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--state-dir {root}: cannot create it ({e.strerror or e})")
        if not os.access(self.jobs_dir, os.W_OK | os.X_OK):
            raise UsageError(f"--state-dir {root}: not writable by this user")

    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.jobs_dir, job_id)

    def load(self) -> dict[str, JobRecord]:
        """Every record, by id; corrupt ones reported (and marked) rather than dropped."""
        records = {}
        for name in sorted(os.listdir(self.jobs_dir), key=lambda n: (len(n), n)):
            path = os.path.join(self.jobs_dir, name, "job.json")
            if not name.isdigit() or not os.path.isdir(os.path.dirname(path)):
                continue
            if not os.path.exists(path):
                self.log.warn(f"{os.path.dirname(path)} holds no job.json: a submission that was "
                              f"never accepted; ignored")
                continue
            records[name] = self._read(name, path)
        return records

    def _read(self, job_id: str, path: str) -> JobRecord:
        try:
            with open(path, "rb") as fh:
                doc = json.loads(fh.read().decode("utf-8"))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {str(doc.get('format'))[:40]!r}, expected {FORMAT!r}")
            if _digest(doc["job"]) != doc.get("sha256"):
                raise ValueError("checksum mismatch")
            record = JobRecord(**doc["job"])
            if record.id != job_id or record.state not in STATES:
                raise ValueError("its id or state is not valid")
            return record
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = e.strerror if isinstance(e, OSError) else str(e)[:200]
            message = f"{path} is corrupt ({why}); the job is not run: restore the file or remove its directory"
            self.log.warn(message)
            return JobRecord(id=job_id, seq=int(job_id), name="", priority=0, values={},
                             state="failed", exit_code=2, message=message, corrupt=True)

    def next_id(self, records: dict[str, JobRecord]) -> str:
        taken = [int(i) for i in records] + [int(n) for n in os.listdir(self.jobs_dir) if n.isdigit()]
        return str(max(taken, default=0) + 1)

    def create(self, record: JobRecord, config_toml) -> None:
        """A new job's directory, its resolved config (`config_toml()`, once the directory
        exists) and its record (last: the job exists once its record does)."""
        directory = self.job_dir(record.id)
        try:
            os.makedirs(os.path.join(directory, "checkpoints"))
            text = config_toml()
            ckpt.atomic_write(os.path.join(directory, "config.toml"),
                              lambda fh: fh.write(text + "\n"), binary=False)
        except OSError as e:
            raise OutputError(f"cannot create {directory}: {e.strerror or e}")
        self.save(record)

    def save(self, record: JobRecord) -> None:
        """Write the record atomically (temporary file, fsync, rename, fsync of the directory)."""
        if record.corrupt:
            return
        body = asdict(record)
        del body["corrupt"]
        doc = {"format": FORMAT, "sha256": _digest(body), "job": body}
        path = os.path.join(self.job_dir(record.id), "job.json")
        try:
            ckpt.atomic_write(path, lambda fh: json.dump(doc, fh, indent=1, sort_keys=True),
                              binary=False)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}")

    def file(self, job_id: str, name: str) -> str:
        return os.path.join(self.job_dir(job_id), name)
