"""Expert-parallel communication volume: our all-to-all dispatcher vs an all-gather dispatch.

For EP ranks on gloo (default EP=2, 4096 tokens per rank, dim 1024, 32 experts, top-4, fp32,
uniform random routing) each rank dispatches its tokens with `AllToAllDispatcher`, runs
identity experts, combines, and backpropagates; the dispatcher's `stats` count the bytes each
rank sends to other ranks. The all-gather design (the reference's) sends every token to every
other EP rank on dispatch and reduce-scatters the same volume back on combine; it is run too
(`all_gather_into_tensor` + `reduce_scatter_tensor`) for its forward wall time, and its volume is
(ep - 1) * T * D * bytes per rank each way.

Lower bound for any dispatcher that moves only routed tokens: a token must reach each remote
rank owning at least one of its experts, so with uniform top-K routing the expected rows per
token are (ep - 1) * (1 - C(E - L, K) / C(E, K)), L = E / ep (0.949 for EP=2, E=32, K=4).

    .venv/bin/python bench/moe_ep.py            # EP=2 at the issue's shape
    .venv/bin/python bench/moe_ep.py --ep 4     # 4 ranks
    .venv/bin/python bench/moe_ep.py --quick    # small shape
    .venv/bin/python bench/moe_ep.py --ep 8 --experts 8 --top-k 2 --tokens 2048 --dim 512
        # one expert per rank: the regime where the bound equals top_k / E

The issue's goal (bytes <= top_k/E + 10% of the all-gather volume) is the one-expert-per-rank
value of that bound; with several experts per rank (EP=2, E=32) no routed-token dispatcher can
reach it, since nearly every token has an expert on the other rank.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _routing(tokens: int, experts: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    weights, indices = logits.softmax(-1).topk(top_k, dim=-1)
    return weights, indices


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_volume(rank: int, world: int, tokens: int, dim: int, experts: int, top_k: int,
                dtype_name: str, repeats: int) -> dict:  # fmt: skip
    """One EP rank: bytes sent by the all-to-all dispatcher, and both designs' wall time."""
    from am_moe.dispatch import AllToAllDispatcher

    dtype = DTYPES[dtype_name]
    torch.manual_seed(rank)
    x_TD = torch.randn(tokens, dim, dtype=dtype, requires_grad=True)
    weights_TK, indices_TK = _routing(tokens, experts, top_k, seed=100 + rank)
    weights_TK.requires_grad_(True)
    disp = AllToAllDispatcher(experts, dist.group.WORLD)

    def ours() -> None:
        x_ND, _counts_L, ctx = disp.dispatch(x_TD, weights_TK, indices_TK, None)
        disp.combine(x_ND, ctx).sum().backward()  # identity experts

    ours()
    stats = disp.stats
    sent = {"dispatch": stats.dispatch_bytes, "combine": stats.combine_bytes,
            "metadata": stats.metadata_bytes}  # fmt: skip
    # Backward runs the same collectives reversed: combine's rows go out again on the
    # dispatch side and vice versa, so a training step sends twice the forward volume.
    x_flat = x_TD.detach()

    def all_gather_design() -> None:
        gathered = x_flat.new_empty(world * tokens, dim)
        dist.all_gather_into_tensor(gathered, x_flat)
        back = x_flat.new_empty(tokens, dim)
        dist.reduce_scatter_tensor(back, gathered)

    def ours_forward() -> None:
        with torch.no_grad():
            x_ND, _counts_L, ctx = disp.dispatch(x_flat, weights_TK, indices_TK, None)
            disp.combine(x_ND, ctx)

    seconds_ours = _timed(ours_forward, repeats)
    seconds_ag = _timed(all_gather_design, repeats)
    return {"sent": sent, "seconds_ours_fwd": seconds_ours, "seconds_allgather_fwd": seconds_ag}


def expected_remote_rows_per_token(experts: int, top_k: int, ep: int) -> float:
    """Uniform top-K routing: expected remote ranks a token must reach."""
    local = experts // ep
    return (ep - 1) * (1 - math.comb(experts - local, top_k) / math.comb(experts, top_k))


def ep_volume_report(tokens: int = 4096, dim: int = 1024, experts: int = 32, top_k: int = 4,
                     ep: int = 2, dtype: str = "fp32", repeats: int = 5) -> dict:  # fmt: skip
    """Spawn `ep` gloo ranks, measure, print the comparison; return the numbers."""
    from am_dtype.testing import run_distributed

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    worker = importlib.import_module("moe_ep").rank_volume  # importable by spawned ranks
    per_rank = run_distributed(worker, ep, tokens, dim, experts, top_k, dtype, repeats,
                               timeout_s=600)  # fmt: skip
    elem = DTYPES[dtype].itemsize
    allgather_dispatch = (ep - 1) * tokens * dim * elem
    goal = top_k / experts + 0.10
    bound = expected_remote_rows_per_token(experts, top_k, ep) / (ep - 1)
    print(f"shape: {tokens} tokens/rank, dim {dim}, {experts} experts, top-{top_k}, {dtype}, "
          f"EP={ep} (gloo, uniform routing)")  # fmt: skip
    print(
        f"{'rank':>4} {'a2a dispatch MB':>16} {'a2a combine MB':>15} {'metadata MB':>12} "
        f"{'all-gather MB':>14} {'ratio':>6} {'a2a ms':>7} {'AG+RS ms':>9}"
    )
    ratios = []
    for rank, res in enumerate(per_rank):
        sent = res["sent"]
        ratio = (sent["dispatch"] + sent["metadata"]) / allgather_dispatch
        ratios.append(ratio)
        print(f"{rank:>4} {sent['dispatch'] / 1e6:>16.2f} {sent['combine'] / 1e6:>15.2f} "
              f"{sent['metadata'] / 1e6:>12.3f} {allgather_dispatch / 1e6:>14.2f} {ratio:>6.3f} "
              f"{res['seconds_ours_fwd'] * 1e3:>7.1f} "
              f"{res['seconds_allgather_fwd'] * 1e3:>9.1f}")  # fmt: skip
    mean_ratio = sum(ratios) / len(ratios)
    print(
        "ms: one forward dispatch+combine (ours, identity experts) vs all-gather + "
        "reduce-scatter of the same tokens; median over repeats"
    )
    print(f"bytes sent per rank, all-to-all / all-gather (dispatch incl. metadata; combine is "
          f"the same rows back): {mean_ratio:.3f}")  # fmt: skip
    print(
        f"lower bound for routed-only dispatch under uniform top-{top_k}: {bound:.3f}; "
        f"one row per (token, expert) without dedup would be {top_k / ep:.3f}"
    )
    verdict = (
        "met"
        if mean_ratio <= goal
        else ("NOT met" + (": the goal is below that lower bound" if goal < bound else ""))
    )
    print(f"issue goal <= top_k/E + 10% = {goal:.3f}: {verdict}")
    return {"ratio": mean_ratio, "goal": goal, "lower_bound": bound, "per_rank": per_rank}


def run_ep_volume(quick: bool = False) -> dict:
    """Entry point used by bench/moe.py."""
    if quick:
        return ep_volume_report(tokens=512, dim=256, experts=8, top_k=2, repeats=2)
    return ep_volume_report()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens, dim 256, 8 experts")
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        ep_volume_report(tokens=512, dim=256, experts=8, top_k=2, ep=args.ep, repeats=2)
    else:
        ep_volume_report(tokens=args.tokens, dim=args.dim, experts=args.experts,
                         top_k=args.top_k, ep=args.ep, dtype=args.dtype,
                         repeats=args.repeats)  # fmt: skip


if __name__ == "__main__":
    main()
