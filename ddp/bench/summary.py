"""The order the runs go in, and what they add up to: medians per program and the
ratios between programs, per (layers, ranks)."""
from __future__ import annotations

import statistics

from ..benchloops import gemm_flops
from .options import Options, base_program

RATIOS = (("ddp/limit", "ddp", "limit"), ("ddp/lean", "ddp", "lean"),
          ("ddp/torch", "ddp", "torch"), ("zmq/ddp", "zmq", "ddp"))
GEMM_RATIO = "ddp/sgemm"   # ddp-train's achieved GEMM FLOP/s ÷ numpy's, at 1 rank


def ddp_names(names) -> list[str]:
    """The names under which ddp runs: ddp, or ddp:NAME for each variant."""
    return [n for n in names if base_program(n) == "ddp"]


def ratio_names(names) -> list[tuple[str, str, str]]:
    """(name, a, b) of every ratio a / b between these programs: RATIOS with each of
    ddp's names in place of ddp, then every further variant against the first."""
    ddps = ddp_names(names)

    def as_run(p: str) -> list[str]:
        return ddps if p == "ddp" else [p] if p in names else []

    out = [(f"{x}/{y}", x, y) for _, a, b in RATIOS for x in as_run(a) for y in as_run(b)]
    return out + [(f"{v}/{ddps[0]}", v, ddps[0]) for v in ddps[1:]]


# --- the schedule -------------------------------------------------------------------


def programs_for(ranks: int, programs: tuple[str, ...]) -> list[str]:
    return [p for p in programs if p != "sgemm" or ranks == 1]


def rotated(items: list, k: int) -> list:
    """The order of repeat k: shifted by k, so each program takes every slot in turn."""
    if not items:
        return []
    k %= len(items)
    return items[k:] + items[:k]


def schedule(opts: Options, skipped: dict) -> list[tuple[int, tuple[int, ...], int, str]]:
    """(repeat, layers, ranks, program) in the order they run (ddp once per variant)."""
    jobs = []
    for repeat in range(opts.repeats):
        for layers in opts.layers:
            for ranks in opts.ranks:
                todo = [p for p in programs_for(ranks, opts.names()) if p not in skipped]
                jobs += [(repeat, layers, ranks, p) for p in rotated(todo, repeat)]
    return jobs


# --- medians and ratios -------------------------------------------------------------


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def ratio_stats(by_repeat_a: dict[int, float], by_repeat_b: dict[int, float]) -> dict:
    """Both views of a / b: the quotient of the medians, and the median of the per-repeat
    quotients (the pairs ran next to each other, so they share the machine's drift)."""
    pairs = [by_repeat_a[r] / by_repeat_b[r] for r in sorted(by_repeat_a)
             if r in by_repeat_b and by_repeat_b[r]]
    return {"of_medians": _ratio(_median(list(by_repeat_a.values())), _median(list(by_repeat_b.values()))),
            "pairwise": _median(pairs), "pairs": pairs}


class _Combination:
    """The runs of one (layers, ranks), read by program and repeat."""

    def __init__(self, runs: list[dict], layers: tuple[int, ...], ranks: int, hosts: int | None = None):
        self.runs = [r for r in runs if tuple(r["layers"]) == layers and r["ranks"] == ranks]
        self.hosts = hosts

    def of(self, program: str) -> list[dict]:
        return [r for r in self.runs if r["program"] == program]

    def values(self, program: str, key: str = "samples_per_second") -> dict[int, float]:
        """{repeat: key} of the program's successful runs."""
        return {r["repeat"]: r[key] for r in self.of(program) if r["ok"] and r.get(key) is not None}

    def median_of_result(self, program: str, key: str) -> float | None:
        """The median of a key of the program's measurements (its `result`)."""
        return _median([r["result"].get(key) for r in self.of(program) if r["ok"]])

    def median_host_bytes(self, program: str) -> list[float | None]:
        """Per host, the median of the bytes it sent over its link in the program's runs."""
        sent = [r["host_bytes"]["sent"] for r in self.of(program) if r["ok"] and "host_bytes" in r]
        return [_median([s[h] for s in sent]) for h in range(self.hosts)]


def _program_entry(c: _Combination, program: str, skipped: dict) -> dict:
    """One program's runs and failures, its median rate and what else the table shows of it."""
    runs = c.of(program)
    entry = {"runs": sum(r["ok"] for r in runs), "failed": sum(not r["ok"] for r in runs),
             "samples_per_second": _median(list(c.values(program).values()))}
    if program in skipped:
        entry["skipped"] = skipped[program]
    if c.hosts:
        entry["host_bytes_sent"] = c.median_host_bytes(program)
    if base_program(program) == "ddp":
        entry["allreduce_fraction"] = c.median_of_result(program, "allreduce_fraction")
        entry["gemm_flops_per_second"] = _median(list(c.values(program, "gemm_flops_per_second").values()))
    if program == "zmq":
        entry["bytes_per_step"] = c.median_of_result(program, "bytes_per_step")
    if program == "sgemm":
        entry["flops_per_second"] = _median(list(c.values(program, "flops_per_second").values()))
        entry["flops_per_second_1thread"] = c.median_of_result(program, "flops_per_second_1thread")
    return entry


def _ratios(c: _Combination, programs: dict, ranks: int) -> dict:
    ratios = {name: ratio_stats(c.values(a), c.values(b)) for name, a, b in ratio_names(list(programs))}
    ddps = ddp_names(programs)
    if ranks == 1 and ddps and "sgemm" in programs:   # the first of ddp's names
        ratios[GEMM_RATIO] = ratio_stats(c.values(ddps[0], "gemm_flops_per_second"),
                                         c.values("sgemm", "flops_per_second"))
    return ratios


def summarize(runs: list[dict], opts: Options, skipped: dict) -> list[dict]:
    """Per (layers, ranks): every program's entry and the ratios between them."""
    combos = []
    for layers in opts.layers:
        for ranks in opts.ranks:
            c = _Combination(runs, layers, ranks, opts.hosts)
            programs = {p: _program_entry(c, p, skipped) for p in programs_for(ranks, opts.names())}
            combos.append({"layers": list(layers), "ranks": ranks,
                           "threads_per_rank": opts.threads_per_rank(ranks),
                           "gemm_flops_per_step": gemm_flops(list(layers), opts.batch),
                           "programs": programs, "ratios": _ratios(c, programs, ranks)})
    return combos
