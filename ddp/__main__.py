"""`python -m ddp COMMAND ...`: the console scripts without the scripts."""
import sys

from .cli import run_train
from .job_cli import run_job
from .keygen import run_keygen
from .predict import run_predict
from .worker_cli import run_worker

COMMANDS = {
    "train": run_train,
    "coordinator": lambda argv: run_train(argv, prog="ddp-coordinator"),
    "worker": run_worker,
    "job": run_job,
    "keygen": run_keygen,
    "predict": run_predict,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m ddp {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
