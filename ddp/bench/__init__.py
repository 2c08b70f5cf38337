"""ddp-bench: how fast ddp-train trains, measured against what this machine allows.

    options   the flags and the Options they give (what --help says)
    machine   the CPU, memory and libraries the runs met
    run       one program: its command, its process tree, its measurement
    summary   the schedule (rotated every repeat), medians and pairwise ratios
    table     the Markdown report
    cli       main: the runs with progress lines, exit codes, Ctrl-C and SIGTERM

The loops it measures ddp-train against live in ddp.benchloops.
"""
from .cli import main

__all__ = ["main"]
