"""The order the runs go in, and what they add up to: medians per program and the
ratios between programs, per (layers, ranks)."""
from __future__ import annotations

import statistics

from ..benchloops import gemm_flops
from .options import Options

RATIOS = (("ddp/limit", "ddp", "limit"), ("ddp/lean", "ddp", "lean"),
          ("ddp/torch", "ddp", "torch"), ("zmq/ddp", "zmq", "ddp"))
GEMM_RATIO = "ddp/sgemm"   # ddp-train's achieved GEMM FLOP/s ÷ numpy's, at 1 rank


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
    """(repeat, layers, ranks, program) in the order they run."""
    jobs = []
    for repeat in range(opts.repeats):
        for layers in opts.layers:
            for ranks in opts.ranks:
                todo = [p for p in programs_for(ranks, opts.programs) if p not in skipped]
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

    def __init__(self, runs: list[dict], layers: tuple[int, ...], ranks: int):
        self.runs = [r for r in runs if tuple(r["layers"]) == layers and r["ranks"] == ranks]

    def of(self, program: str) -> list[dict]:
        return [r for r in self.runs if r["program"] == program]

    def values(self, program: str, key: str = "samples_per_second") -> dict[int, float]:
        """{repeat: key} of the program's successful runs."""
        return {r["repeat"]: r[key] for r in self.of(program) if r["ok"] and r.get(key) is not None}

    def median_of_result(self, program: str, key: str) -> float | None:
        """The median of a key of the program's measurements (its `result`)."""
        return _median([r["result"].get(key) for r in self.of(program) if r["ok"]])


def _program_entry(c: _Combination, program: str, skipped: dict) -> dict:
    """One program's runs and failures, its median rate and what else the table shows of it."""
    runs = c.of(program)
    entry = {"runs": sum(r["ok"] for r in runs), "failed": sum(not r["ok"] for r in runs),
             "samples_per_second": _median(list(c.values(program).values()))}
    if program in skipped:
        entry["skipped"] = skipped[program]
    if program == "ddp":
        entry["allreduce_fraction"] = c.median_of_result(program, "allreduce_fraction")
        entry["gemm_flops_per_second"] = _median(list(c.values(program, "gemm_flops_per_second").values()))
    if program == "zmq":
        entry["bytes_per_step"] = c.median_of_result(program, "bytes_per_step")
    if program == "sgemm":
        entry["flops_per_second"] = _median(list(c.values(program, "flops_per_second").values()))
        entry["flops_per_second_1thread"] = c.median_of_result(program, "flops_per_second_1thread")
    return entry


def _ratios(c: _Combination, programs: dict, ranks: int) -> dict:
    ratios = {name: ratio_stats(c.values(a), c.values(b)) for name, a, b in RATIOS
              if a in programs and b in programs}
    if ranks == 1 and "ddp" in programs and "sgemm" in programs:
        ratios[GEMM_RATIO] = ratio_stats(c.values("ddp", "gemm_flops_per_second"),
                                         c.values("sgemm", "flops_per_second"))
    return ratios


def summarize(runs: list[dict], opts: Options, skipped: dict) -> list[dict]:
    """Per (layers, ranks): every program's entry and the ratios between them."""
    combos = []
    for layers in opts.layers:
        for ranks in opts.ranks:
            c = _Combination(runs, layers, ranks)
            programs = {p: _program_entry(c, p, skipped) for p in programs_for(ranks, opts.programs)}
            combos.append({"layers": list(layers), "ranks": ranks,
                           "threads_per_rank": opts.threads_per_rank(ranks),
                           "gemm_flops_per_step": gemm_flops(list(layers), opts.batch),
                           "programs": programs, "ratios": _ratios(c, programs, ranks)})
    return combos
