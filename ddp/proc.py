"""Process trees: find every process a command started, and stop them all.

A process started in a session of its own leads a process group, but that does
not reach everything it started: mpirun's proxy starts the ranks in sessions of
their own. So these helpers signal the group *and* every descendant, found by
walking the parent links in /proc (stdlib only: the package must not need psutil).
"""
from __future__ import annotations

import os
import signal
import subprocess


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children before their children); [] without procfs,
    where only the process group can be reached."""
    children = _children_by_parent()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _children_by_parent() -> dict[int, list[int]]:
    """{ppid: [pid, ...]} of every process /proc shows now."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if entry.isdigit():
            ppid = _parent(entry)
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    return children


def _parent(pid: str) -> int | None:
    """The ppid field of /proc/PID/stat (after the command name, which may hold spaces
    and parentheses); None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def signal_tree(leader: int, pids, sig: int) -> None:
    """Send sig to the process group of `leader` and to every pid in `pids`, skipping
    those already gone."""
    try:
        os.killpg(leader, sig)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process, its group and every descendant."""
    signal_tree(proc.pid, descendants(proc.pid), signal.SIGKILL)


def stop_tree(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM the process, its group and all its descendants (ddp-train then cleans up
    and exits); SIGKILL whatever is left after `grace` seconds. A second Ctrl-C or
    SIGTERM meanwhile waits until this is done, so it cannot leave ranks behind."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        _stop_tree(proc, grace)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _stop_tree(proc: subprocess.Popen, grace: float) -> None:
    victims = descendants(proc.pid)
    signal_tree(proc.pid, victims, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # what was started meanwhile, and the descendants SIGTERM left running
    victims += descendants(proc.pid)
    signal_tree(proc.pid, victims, signal.SIGKILL)
