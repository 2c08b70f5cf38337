"""`python -m ddp train|predict ...`: the console scripts without the scripts."""
import sys

from .cli import run_predict, run_train

COMMANDS = {"train": run_train, "predict": run_predict}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m ddp {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
