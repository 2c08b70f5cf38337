"""The Markdown report of a ddp-bench document: rates and ratios, the GEMM rates at
1 rank, the exchange's share and bytes, notes, failures, the machine."""
from __future__ import annotations

from ..log import human_bytes
from .machine import machine_line
from .options import PROGRAMS, layers_text, program_names
from .summary import GEMM_RATIO, ddp_names, ratio_names


def _rate_cell(entry: dict) -> str:
    if "skipped" in entry:
        return "skipped"
    if entry["samples_per_second"] is None:
        return "failed"
    cell = f"{entry['samples_per_second']:,.0f}"
    return cell + (f" ({entry['failed']} failed)" if entry["failed"] else "")


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _giga(x, fmt: str) -> str:
    """x / 1e9 in GFLOP/s, or "-" for None."""
    return _num(x and x / 1e9, fmt)


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _headline(doc: dict) -> list[str]:
    opts = doc["options"]
    threads = (f"BLAS threads per rank = {opts['threads']}." if opts.get("threads") else
               f"BLAS threads per rank = {doc['machine']['cores']} cores ÷ ranks.")
    return [f"ddp-bench {doc['version']}: samples/s, median of {opts['repeats']} runs; ratios: median of "
            f"per-repeat pairs (a_i / b_i, same repeat). float32, global batch {opts['batch']}, "
            f"{opts['steps']} timed steps after {opts['warmup']} warm-up, " + threads, ""]


def _gbit(bytes_per_second: float) -> str:
    return f"{bytes_per_second * 8 / 1e9:.3g} Gbit/s"


def _hosts_lines(doc: dict) -> list[str]:
    """Where the MPI programs ran under --hosts, and what the link measured."""
    h, link = doc["hosts"], doc["hosts"]["measured"]
    out = [f"Hosts: the ranks spread evenly over {h['hosts']} emulated hosts (network namespaces "
           f"on this machine, sharing its {doc['machine']['cores']} cores), link {h['link']} each."]
    if not link["ok"]:
        return out + [f"Link: not measured: {link['error']}", ""]
    sizes = [s for s in link["sizes"] if s["what"] != "alpha"]
    alpha = link["alpha_seconds"]
    out.append(f"Link: α = {alpha * 1e6:.1f} µs (one 8-byte Allreduce, a rank on each of 2 hosts, "
               f"median of {link['sizes'][0]['rounds']} rounds); bandwidth "
               + ", ".join(f"{_gbit(s['bandwidth_bytes_per_second'])} at {human_bytes(s['bytes'])} "
                           f"({s['what']})" for s in sizes)
               + " = bytes ÷ time (a ring Allreduce of N ranks sends 2·(N−1)/N·bytes per rank "
                 "each way: at N = 2, the bytes).")
    return out + [""]


def _rates_table(combos: list[dict], shown: list[str], ratios: list[str]) -> list[str]:
    """One row per (layers, ranks): every program's median rate, then the ratios."""
    out = [_row(["layers", "ranks", *shown, *ratios]),
           _row(["---"] * (2 + len(shown) + len(ratios)))]
    for c in combos:
        cells = [layers_text(c["layers"]), str(c["ranks"])]
        cells += [_rate_cell(c["programs"][p]) for p in shown]
        cells += [_num(c["ratios"][name]["pairwise"], ".2f") for name in ratios]
        out.append(_row(cells))
    return out + [""]


def _gemm_table(ones: list[dict]) -> list[str]:
    """The 1-rank combinations: numpy's sgemm against the GEMM rate inside ddp-train
    (the first of ddp's names, with variants)."""
    t = ones[0]["threads_per_rank"]
    plural = "s" * (t > 1)
    one_thread = t != 1  # at 1 thread the two sgemm columns would be one twice
    ddps = ddp_names(ones[0]["programs"])
    with_ddp = bool(ddps)
    header = ["layers", "GEMM GFLOP/step", f"numpy sgemm GFLOP/s ({t} thread{plural})"]
    header += ["numpy sgemm GFLOP/s (1 thread)"] * one_thread
    if with_ddp:
        header += [f"ddp-train GEMM GFLOP/s ({t} thread{plural})", "ddp-train/numpy"]
    out = ["GEMMs of one step at 1 rank (forward a·W, dW = aᵀ·δ, δ·Wᵀ; 2·m·n·k FLOPs): "
           "numpy alone vs. achieved inside ddp-train (FLOPs per step × steps/s).", "",
           _row(header), _row(["---"] * len(header))]
    for c in ones:
        sg = c["programs"]["sgemm"]
        cells = [layers_text(c["layers"]), f"{c['gemm_flops_per_step'] / 1e9:.3g}",
                 _giga(sg["flops_per_second"], ".1f")]
        if one_thread:
            cells.append(_giga(sg["flops_per_second_1thread"], ".1f"))
        if with_ddp:
            cells += [_giga(c["programs"][ddps[0]]["gemm_flops_per_second"], ".1f"),
                      _num(c["ratios"][GEMM_RATIO]["pairwise"], ".2f")]
        out.append(_row(cells))
    return out + [""]


def _per_combination(combos: list[dict], what: str, cell) -> str:
    return what + "; ".join(f"{layers_text(c['layers'])} ×{c['ranks']} {cell(c)}" for c in combos)


def _notes(doc: dict, shown: list[str]) -> list[str]:
    """The exchange lines, the skipped programs' notes and every failed run."""
    combos, out = doc["combinations"], []
    for name in ddp_names(shown):
        what = "" if name == "ddp" else f" ({name})"
        out.append(_per_combination(combos, f"ddp-train gradient exchange{what}, share of step time: ",
                                    lambda c: _num(c["programs"][name]["allreduce_fraction"], ".1%")))
    if "zmq" in shown and "zmq" not in doc["skipped"]:
        out.append(_per_combination(combos, "zmq bytes per step (sent + received by the coordinator): ",
                                    lambda c: human_bytes(c["programs"]["zmq"]["bytes_per_step"], "-")))
    if doc.get("hosts"):
        out += [_per_combination(combos, f"bytes each host sent over its link, median per run ({p}): ",
                                 lambda c: "[" + ", ".join(human_bytes(b, "-") for b in
                                                           c["programs"][p]["host_bytes_sent"]) + "]")
                for p in shown]
    out += [f"note: {note}" for note in doc["skipped"].values()]
    out += [f"failed: {r['program']} {layers_text(r['layers'])} ×{r['ranks']} "
            f"(repeat {r['repeat'] + 1}): {r['error']}" for r in doc["runs"] if not r["ok"]]
    return out


def format_table(doc: dict) -> str:
    """The whole report of a document run_bench made, as text."""
    opts, combos = doc["options"], doc["combinations"]
    variants = [v[0] for v in opts.get("variants", ())]
    shown = program_names([p for p in PROGRAMS if p in opts["programs"] and p != "sgemm"], variants)
    if doc.get("hosts"):   # only what ran across the hosts: the notes say why the rest did not
        shown = [p for p in shown if p not in doc["skipped"]]
    ratios = [name for name, _, _ in ratio_names(shown)]
    out = _headline(doc)
    if doc.get("hosts"):
        out += _hosts_lines(doc)
    if shown:
        out += _rates_table(combos, shown, ratios)
    ones = [c for c in combos if c["ranks"] == 1 and "sgemm" in c["programs"]]
    if ones:
        out += _gemm_table(ones)
    out += _notes(doc, shown)
    out.append(machine_line(doc["machine"]))
    return "\n".join(out)
