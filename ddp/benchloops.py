"""The reference loops that `ddp-bench` measures ddp-train against.

    python -m ddp.benchloops lean  [--no-comm] ...   under mpirun -n R
    python -m ddp.benchloops torch ...               under torch.distributed.run
    python -m ddp.benchloops sgemm ...               one process
    python -m ddp.benchloops link --sizes B,B,...    under mpiexec, a rank on each of 2 hosts

`lean` is the leanest numpy + mpi4py data-parallel step there is: parameters and
gradients in one flat buffer each (views per layer), a fixed random shard per
rank, one in-place Allreduce of the gradient sums per step, SGD on the flat
buffer. Whatever ddp-train spends beyond it (data schedule, shuffled shards,
bookkeeping, logging) shows as ddp/lean < 1. With `--no-comm` the Allreduce is
left out and the ranks only meet at the Barriers around the timed window: the
rate R independent processes reach on this machine, the limit no exchange of
gradients can beat.

`torch` is the same step in PyTorch DistributedDataParallel (gloo, CPU), the
usual yardstick. `sgemm` times numpy's own matrix products at the exact shapes
of one training step: the GEMM rate this BLAS can give the model at all.
`link` times in-place Allreduces of the given byte sizes between the ranks: at 8
bytes the latency α of the network between them, at megabytes its bandwidth.

Each prints one JSON line on stdout (rank 0): the training loops and sgemm with at
least `samples_per_second`, link with the seconds of one Allreduce of each size.
Their BLAS (torch: intra-op) threads follow ddp-train's rule (ddp.threads).
These are measurements, not the trainer: nothing here is imported by ddp-train.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

from .threads import choose_threads, limit_threads

LR = 0.05


# --- the model on one flat buffer ---------------------------------------------


def n_parameters(layers: list[int]) -> int:
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in zip(layers[:-1], layers[1:]))


def layer_views(flat: np.ndarray, layers: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W_i, b_i)] as views into `flat`, W_i of shape (fan_in, fan_out)."""
    views, offset = [], 0
    for fan_in, fan_out in zip(layers[:-1], layers[1:]):
        W = flat[offset:offset + fan_in * fan_out].reshape(fan_in, fan_out)
        offset += fan_in * fan_out
        b = flat[offset:offset + fan_out]
        offset += fan_out
        views.append((W, b))
    return views


def he_init_(params, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for W, b in params:
        W[...] = rng.standard_normal(W.shape) * np.sqrt(2.0 / W.shape[0])
        b[...] = 0


def shard_rows(global_batch: int, rank: int, world_size: int) -> int:
    """Rows of this rank's contiguous shard: near-equal, summing to the global batch."""
    return global_batch // world_size + (rank < global_batch % world_size)


def random_shard(layers: list[int], rows: int, rank: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([rank, 1])
    X = rng.standard_normal((rows, layers[0])).astype(dtype)
    y = rng.integers(0, layers[-1], rows)
    return X, y


def grad_sums_(params, grads, X: np.ndarray, y: np.ndarray) -> float:
    """Forward (ReLU hidden layers), softmax cross-entropy, backward: the sums of the
    per-sample gradients of the shard into `grads`; returns the loss sum.

    dW_i = a_iᵀ·δ,  db_i = Σ_rows δ,  δ ← (δ·W_iᵀ) ⊙ [a_i > 0]
    """
    acts = [X]
    last = len(params) - 1
    for i, (W, b) in enumerate(params):
        z = acts[-1] @ W
        z += b
        if i < last:
            np.maximum(z, 0, out=z)
        acts.append(z)
    p = acts[-1]                                   # softmax in place
    p -= p.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss_sum = float(-np.log(p[rows, y]).sum())
    delta = p                                      # ∂(Σ loss)/∂z = softmax − onehot
    delta[rows, y] -= 1
    for i in range(last, -1, -1):
        dW, db = grads[i]
        np.matmul(acts[i].T, delta, out=dW)
        delta.sum(axis=0, out=db)
        if i > 0:
            delta = delta @ params[i][0].T
            delta *= acts[i] > 0
    return loss_sum


def _warn(message: str) -> None:
    print(f"benchloops: warning: {message}", file=sys.stderr, flush=True)


def _threads(requested: int | None, local_ranks: int) -> int:
    """ddp-train's rule (ddp.threads): --threads, else *_NUM_THREADS, else cores ÷ the
    ranks on this host. ddp-bench always passes --threads, so its runs get its count."""
    threads, _, ignored = choose_threads(requested, local_ranks)
    for message in ignored:
        _warn(message)
    return threads


# --- lean: numpy + mpi4py -------------------------------------------------------


def run_lean(args) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world_size = comm.rank, comm.size
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)   # the ranks that share this host's cores
    threads, _ = limit_threads(args.threads, node.Get_size(), _warn)   # what BLAS now reports
    node.Free()
    dtype = np.dtype(args.dtype)
    layers = args.layers
    n = n_parameters(layers)
    params_flat = np.empty(n, dtype)
    sums = np.empty(n + 1, dtype)                  # gradient sums and the loss sum: one Allreduce
    grads_flat = sums[:n]
    params, grads = layer_views(params_flat, layers), layer_views(grads_flat, layers)
    he_init_(params)
    X, y = random_shard(layers, shard_rows(args.batch, rank, world_size), rank, dtype)
    scale = args.lr / args.batch                   # the mean over the global batch
    t_exchange = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            comm.Barrier()
            t0 = time.perf_counter()
            t_exchange = 0.0
        sums[n] = grad_sums_(params, grads, X, y)
        if not args.no_comm:
            t1 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
            t_exchange += time.perf_counter() - t1
        grads_flat *= scale                        # params -= lr/batch · grads, no temporary
        params_flat -= grads_flat
    comm.Barrier()
    seconds = time.perf_counter() - t0
    digests = comm.gather(hashlib.sha256(params_flat.tobytes()).hexdigest()[:16], root=0)
    if rank == 0:
        loss_rows = args.batch if not args.no_comm else len(y)
        emit({"program": "limit" if args.no_comm else "lean", "world_size": world_size,
              "samples_per_second": args.batch * args.steps / seconds, "seconds": seconds,
              "steps": args.steps, "step_ms": seconds / args.steps * 1e3,
              "exchange_seconds": t_exchange, "exchange_fraction": t_exchange / seconds,
              "loss": float(sums[n]) / max(loss_rows, 1), "parameters": n,
              "threads_per_rank": threads, "param_digests": digests})
    return 0


# --- torch: PyTorch DistributedDataParallel (gloo) -------------------------------


def run_torch(args) -> int:
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(_threads(args.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group("gloo")                # RANK, WORLD_SIZE, MASTER_* from torchrun
    rank, world_size = dist.get_rank(), dist.get_world_size()
    layers = args.layers
    torch.manual_seed(0)
    modules = []
    for i, (fan_in, fan_out) in enumerate(zip(layers[:-1], layers[1:])):
        modules.append(nn.Linear(fan_in, fan_out))
        if i < len(layers) - 2:
            modules.append(nn.ReLU())
    model = nn.parallel.DistributedDataParallel(nn.Sequential(*modules))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()                # the shard's mean; DDP averages over ranks
    X, y = random_shard(layers, shard_rows(args.batch, rank, world_size), rank, np.float32)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
    dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        emit({"program": "torch", "world_size": world_size,
              "samples_per_second": args.batch * args.steps / seconds, "seconds": seconds,
              "steps": args.steps, "step_ms": seconds / args.steps * 1e3,
              "loss": float(loss.item()), "parameters": n_parameters(layers),
              "threads_per_rank": torch.get_num_threads(), "torch": torch.__version__})
    dist.destroy_process_group()
    return 0


# --- sgemm: numpy's matrix products at the model's shapes ------------------------


def step_gemms(layers: list[int], batch: int, dtype, seed: int = 0):
    """The (a, b, out) of every matrix product in one training step at this batch, with
    the memory layouts training uses (transposes are views, as in grad_sums_):
    forward z = a·W for every layer, dW = aᵀ·δ for every layer, δ·Wᵀ for all but the first."""
    rng = np.random.default_rng(seed)
    products = []
    for i, (fan_in, fan_out) in enumerate(zip(layers[:-1], layers[1:])):
        a = rng.standard_normal((batch, fan_in)).astype(dtype)
        W = rng.standard_normal((fan_in, fan_out)).astype(dtype)
        delta = rng.standard_normal((batch, fan_out)).astype(dtype)
        products.append((a, W, np.empty((batch, fan_out), dtype)))
        products.append((a.T, delta, np.empty((fan_in, fan_out), dtype)))
        if i > 0:
            products.append((delta, W.T, np.empty((batch, fan_in), dtype)))
    return products


def gemm_flops(layers: list[int], batch: int) -> int:
    """2·m·n·k summed over step_gemms: 3 products per layer but the first, which has 2."""
    weights = [fan_in * fan_out for fan_in, fan_out in zip(layers[:-1], layers[1:])]
    return 2 * batch * (3 * sum(weights) - weights[0])


def time_gemms(products, sets: int, warmup: int) -> list[float]:
    """Seconds of each timed pass over the whole set of products."""
    times = []
    for rep in range(warmup + sets):
        t0 = time.perf_counter()
        for a, b, out in products:
            np.matmul(a, b, out=out)
        if rep >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_sgemm(args) -> int:
    from threadpoolctl import threadpool_limits

    threads = _threads(args.threads, 1)
    products = step_gemms(args.layers, args.batch, np.dtype(args.dtype))
    flops = gemm_flops(args.layers, args.batch)
    by_threads = {}
    for n in dict.fromkeys([threads, 1]):          # the runs' thread count, and 1 thread
        with threadpool_limits(limits=n, user_api="blas"):
            times = time_gemms(products, args.steps, args.warmup)
        median = float(np.median(times))
        by_threads[str(n)] = {"median_seconds": median, "best_seconds": min(times),
                              "flops_per_second": flops / median}
    main = by_threads[str(threads)]
    emit({"program": "sgemm", "world_size": 1, "threads_per_rank": threads,
          "samples_per_second": args.batch / main["median_seconds"],
          "flops_per_second": main["flops_per_second"],
          "flops_per_second_1thread": by_threads["1"]["flops_per_second"],
          "gemm_flops_per_step": flops, "products": len(products), "sets": args.steps,
          "by_threads": by_threads})
    return 0


# --- link: the time of an Allreduce between the ranks, by size --------------------


LINK_ROUND_SECONDS = 0.05      # a round of back-to-back Allreduces lasts about this long
LINK_MAX_PER_ROUND = 1000


def allreduce_rounds(comm, buf: np.ndarray, rounds: int) -> tuple[list[float], int]:
    """Seconds of one in-place Allreduce of `buf`, per round, and the Allreduces a round.

    Each round times k Allreduces back to back and divides by k: the ranks leave a
    Barrier up to a message's time apart, and k of them spread that skew thin. k
    comes from the second warm-up Allreduce (the first opens the connections) and
    is rank 0's, so that every rank makes the same calls.
    """
    from mpi4py import MPI

    for _ in range(2):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        first = time.perf_counter() - t0
    k = comm.bcast(max(1, min(LINK_MAX_PER_ROUND, int(LINK_ROUND_SECONDS / max(first, 1e-7)))), root=0)
    times = []
    for _ in range(rounds):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(k):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times.append((time.perf_counter() - t0) / k)
    return times, k


def run_link(args) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    sizes = []
    for nbytes in args.sizes:
        buf = np.zeros(max(1, nbytes // 4), np.float32)   # zeros: the sums stay finite
        times, k = allreduce_rounds(comm, buf, args.rounds)
        sizes.append({"bytes": buf.nbytes, "seconds": float(np.median(times)), "rounds": args.rounds,
                      "per_round": k, "round_seconds": times})
    names = comm.allgather(MPI.Get_processor_name())   # the hosts the ranks ran on
    if comm.rank == 0:
        emit({"program": "link", "world_size": comm.size, "hosts": len(set(names)), "sizes": sizes})
    return 0


# --- command line -----------------------------------------------------------------


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 784,256,10, got {text!r}")
    if len(layers) < 2 or min(layers) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two sizes ≥ 1, got {text!r}")
    return layers


def _int_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected byte counts like 8,8388608, got {text!r}")
    if min(sizes) < 4:
        raise argparse.ArgumentTypeError(f"every size must be ≥ 4 bytes (one float32), got {text!r}")
    return sizes


MODES = {"lean": run_lean, "torch": run_torch, "sgemm": run_sgemm, "link": run_link}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddp.benchloops",
                                description="Reference loops measured by ddp-bench.")
    p.add_argument("mode", choices=list(MODES))
    p.add_argument("--layers", type=parse_layers, default=[784, 256, 10])
    p.add_argument("--batch", type=int, default=256, help="global batch, split over the ranks")
    p.add_argument("--steps", type=int, default=200, help="timed steps (sgemm: timed passes)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before them")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--threads", type=int, help="BLAS (torch: intra-op) threads per rank")
    p.add_argument("--no-comm", action="store_true", help="lean: leave out the Allreduce")
    p.add_argument("--sizes", type=_int_sizes, default=[8, 8 * 2**20],
                   help="link: bytes of each Allreduce timed (rounded down to float32s)")
    p.add_argument("--rounds", type=int, default=15, help="link: timed rounds per size (the median is kept)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.rounds < 1:
        print("benchloops: error: need --steps ≥ 1, --warmup ≥ 0, --batch ≥ 1, --rounds ≥ 1",
              file=sys.stderr)
        return 2
    return MODES[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
