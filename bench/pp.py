"""Pipeline step time: a 2-stage 1F1B pipeline (am_pp on torch.distributed.pipelining) vs one rank.

Two gloo ranks, each pinned to its own core with one intra-op thread, run one training step
(forward + backward over the global batch, 8 microbatches) of a Llama-shaped transformers
model split into 2 stages; rank 0 also times the same model on the same global batch alone
(one process, one thread, one forward + backward), interleaved repeat by repeat with the
pipeline steps so both see the same machine load. Medians are reported, with the load
average before and after, and each timing's process CPU time: on a shared machine a CPU
share (CPU / wall) well under 1 means the process waited for a core.

The ideal pipeline time is the per-stage share of the work stretched by the bubble:
T_pp / T_1 = (1/p) * (m + p - 1) / m, i.e. 1/p of the work plus the bubble, which is
(p - 1) / (m + p - 1) of the pipeline step (0.5625 for p = 2, m = 8).

Where the time goes (CPU ms per rank, all from the same run):
- each rank's own stage module run by hand over the same microbatches (forward + backward,
  no PipelineStage, no schedule, no p2p), both ranks at once and one at a time: the
  pipeline step's CPU minus the first is what the engine and the p2p cost (ours); the
  first over the second is what two busy cores cost each other on this machine (not ours);
  the busiest stage alone over half the one-rank CPU is the stage split + microbatching
  (the baseline runs the whole batch in one call; the model alone over 8 sequential
  microbatches shows microbatching's part);
- a gloo send + receive of one microbatch's activation, the p2p per microbatch;
- CPU-time estimates of the ratio without other load: the busiest rank's CPU stretched by
  the bubble, and the same with both cores as fast as one alone.

Measured here (2 shared cores, other engineers' jobs running; hidden 256, 8 layers, batch
16 x 128, 1 December 2026): at load 4.6 -> 7.5 the wall ratio was 2.39x the ideal (CPU
shares 0.24-0.25: the ranks waited for cores), the CPU estimate 1.12x; per rank the engine
and p2p cost +7-9% CPU over the same stage work by hand in that run and -3% to +0% in another
(at load 7-8, noise of that order), two busy cores +0-25%, a gloo round trip 1.8 ms per
microbatch, microbatching 1.005x. At --layers 16 (load 6.5 -> 8) the estimate was 1.32x,
microbatching 1.125x: under that load the numbers moved by more than the 10% goal. On the
quiet machine (16:50-16:53, load 0.1 -> 1.1, default shape, two runs): wall ratio 0.608 and
0.585, i.e. 1.082x and 1.040x the ideal 0.5625 (goal <= 1.10: met); engine + p2p +5.1% / +0.8%
CPU per rank; mask cache saves 591 us per microbatch.

Also: the time the per-stage causal-mask cache saves per microbatch (a mask-mapping build
vs a cache hit at the microbatch shape, eager attention so the mask is a real tensor), and
with `--profile` the top functions of each rank's pipeline steps (cProfile, own time).

    .venv/bin/python bench/pp.py            # hidden 256, 8 layers, batch 16 x seq 128
    .venv/bin/python bench/pp.py --quick    # small shape, 2 repeats
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _timing import load_average

P = 2  # pipeline stages (= ranks)


def _model(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=4096,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().train()


def _single_step(model, ids, microbatches: int = 1) -> None:
    """One forward + backward over `ids`, whole or as `microbatches` sequential chunks
    (gradient accumulation: the pipeline's microbatch shapes without the pipeline)."""
    for chunk in ids.chunk(microbatches):
        logits = model(chunk, use_cache=False).logits
        target = F.pad(chunk[:, 1:], (0, 1), value=-100)
        F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100).backward()


def _pin(rank: int) -> list[int]:
    """One core per rank (rank r -> core r of those this process may use)."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    torch.set_num_threads(1)
    return sorted(os.sched_getaffinity(0))


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _medians(times: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Medians of wall and CPU time, without the warm-up round."""
    if not times:
        return None
    return statistics.median(t for t, _ in times[1:]), statistics.median(c for _, c in times[1:])


def _stage_work(pp, rank: int, ids, shape: dict):
    """This rank's share of the step done by hand: its stage module's forward + backward
    over the same microbatches, no PipelineStage, no schedule, no p2p (rank 0 backpropagates
    a fixed output gradient, rank 1 the pipeline loss from a fixed input)."""
    stage, m = pp.stages[0], shape["microbatches"]
    chunks = ids.chunk(m)
    h = torch.randn(chunks[0].shape[0], shape["seq"], shape["hidden"],
                    generator=torch.Generator().manual_seed(2))  # fmt: skip
    pp.loss_fn.set_global_batch(ids)

    def work():
        for chunk in chunks:
            if rank == 0:
                stage(chunk).backward(h)
            else:
                pp.loss_fn(stage(h.clone().requires_grad_()), chunk).backward()

    return work


def _p2p_round_trip(rank: int, shape: dict, n: int = 20) -> float:
    """Seconds of one activation-sized send and one gradient-sized send back (gloo), the
    p2p a microbatch costs at a 2-stage boundary, here without any compute to hide it."""
    mb = shape["batch"] // shape["microbatches"]
    buf = torch.zeros(mb, shape["seq"], shape["hidden"])
    start = time.perf_counter()
    for _ in range(n):
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)
    return (time.perf_counter() - start) / n


def rank_times(rank: int, world: int, shape: dict, repeats: int, profile: bool) -> dict:
    from am_pp import pipeline_model

    cores = _pin(rank)
    model = _model(shape["hidden"], shape["layers"], shape["vocab"])
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]),
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    pp = pipeline_model(model, None, "1F1B", shape["microbatches"])
    by_hand = _stage_work(pp, rank, ids, shape)
    times = {k: [] for k in ("pp", "single", "accum", "hand_both", "hand_alone")}
    profiler = cProfile.Profile() if profile else None

    def clear():
        for p in [*pp.parameters(), *model.parameters()]:
            p.grad = None

    def pp_step():
        pp.step(ids, ids)
        dist.barrier()

    for i in range(repeats + 1):  # the first round warms up (shape inference, allocator)
        dist.barrier()
        if rank == 0:
            times["single"].append(_timed(lambda: _single_step(model, ids)))
            clear()
            times["accum"].append(_timed(lambda: _single_step(model, ids, shape["microbatches"])))
            clear()
        dist.barrier()
        if profiler is not None and i > 0:
            profiler.enable()
        times["pp"].append(_timed(pp_step))
        if profiler is not None and i > 0:
            profiler.disable()
        clear()
        dist.barrier()
        times["hand_both"].append(_timed(by_hand))  # both ranks at once, as in the pipeline
        clear()
        for r in range(world):  # one rank at a time, the other waiting in the barrier
            dist.barrier()
            if r == rank:
                times["hand_alone"].append(_timed(by_hand))
                clear()
        dist.barrier()
    return {
        "cores": cores,
        **{k: _medians(v) for k, v in times.items()},
        "p2p": _p2p_round_trip(rank, shape),
        "mask": _mask_cache_saving(pp, shape) if rank == 1 else None,
        "profile": _top(profiler, repeats) if profiler is not None else None,
    }


def _top(profiler: cProfile.Profile, repeats: int, n: int = 14) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(n)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    return f"(cumulated over {repeats} steps)\n" + "\n".join(lines[-(n + 1) :])


def _mask_cache_saving(pp, shape: dict) -> dict:
    """Build vs hit of the last stage's mask mapping at the microbatch shape."""
    from am_pp._masks import _build_masks, _build_or_reuse_pp_causal_mask, _mask_layer_types

    inner = pp.stages[0].model
    mb = shape["batch"] // shape["microbatches"]
    h = torch.zeros(mb, shape["seq"], shape["hidden"])
    pos = torch.arange(shape["seq"]).unsqueeze(0)
    kinds = _mask_layer_types(inner)
    n = 50
    start = time.perf_counter()
    for _ in range(n):
        _build_masks(inner, h, None, pos, kinds)
    build = (time.perf_counter() - start) / n
    # As the stage forwards call it: position_ids as given (None: default positions).
    _build_or_reuse_pp_causal_mask(inner, h, None, None, None)
    start = time.perf_counter()
    for _ in range(n):
        _build_or_reuse_pp_causal_mask(inner, h, None, None, None)
    hit = (time.perf_counter() - start) / n
    return {"build": build, "hit": hit}


def report(shape: dict, repeats: int, profile: bool) -> None:
    from am_dtype.testing import run_distributed

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = load_average()
    first, last = run_distributed(rank_times, P, shape, repeats, profile, timeout_s=1800)
    load_after = load_average()
    m = shape["microbatches"]
    ideal = (1 / P) * (m + P - 1) / m
    stretch = (m + P - 1) / m  # a rank's busy time -> the step's time (the bubble)
    ranks = (first, last)
    pp_wall = max(r["pp"][0] for r in ranks)
    single_wall, single_cpu = first["single"]
    accum_wall, accum_cpu = first["accum"]
    ratio = pp_wall / single_wall
    print(f"shape: {shape}; 2 gloo ranks x 1 thread, pinned to cores {first['cores']} and "
          f"{last['cores']} of {os.cpu_count()}; median of {repeats} interleaved repeats")  # fmt: skip
    print(f"before: {load_before}; after: {load_after}")
    print("wall ms (CPU ms; CPU share < 1: the process waited for a core or its peer):")
    print(f"  one rank, one thread, whole batch fwd+bwd:     {single_wall * 1e3:9.1f} "
          f"({single_cpu * 1e3:.1f}; share {single_cpu / single_wall:.2f})")  # fmt: skip
    print(f"  one rank, {m} sequential microbatches (accum):  {accum_wall * 1e3:9.1f} "
          f"({accum_cpu * 1e3:.1f}; share {accum_cpu / accum_wall:.2f})")  # fmt: skip
    cpus = [r["pp"][1] for r in ranks]
    print(f"  2-stage 1F1B, {m} microbatches, step:          {pp_wall * 1e3:9.1f} "
          f"(rank 0 {cpus[0] * 1e3:.1f}, rank 1 {cpus[1] * 1e3:.1f}; shares "
          f"{cpus[0] / pp_wall:.2f}, {cpus[1] / pp_wall:.2f})")  # fmt: skip
    print(f"ratio pipeline / one rank: {ratio:.3f}; ideal (1/{P}) * (m+p-1)/m = {ideal:.4f} "
          f"(bubble (p-1)/(m+p-1) = {(P - 1) / (m + P - 1):.3f}); "
          f"ratio / ideal = {ratio / ideal:.3f} (goal <= 1.10)")  # fmt: skip
    _breakdown(ranks, single_cpu, accum_cpu, stretch, ideal, m)
    mask = last["mask"]
    saved = mask["build"] - mask["hit"]
    print(f"mask cache: build {mask['build'] * 1e6:.1f} us, hit {mask['hit'] * 1e6:.2f} us per "
          f"microbatch per stage; saves {saved * 1e6:.1f} us per microbatch "
          f"({100 * saved / (pp_wall / m):.2f}% of a microbatch's share of the step)")  # fmt: skip
    if profile:
        for rank, result in enumerate(ranks):
            print(f"--- rank {rank} pipeline steps, top functions by own time {result['profile']}")


def _breakdown(ranks, single_cpu: float, accum_cpu: float, stretch: float, ideal: float, m):
    """Where each rank's CPU time goes, from the same run (see the module docstring)."""
    print("where the pipeline's CPU time goes, per rank (CPU ms; wall ms in brackets):")
    for rank, r in enumerate(ranks):
        (_, pc), (bw, bc), (aw, ac) = r["pp"], r["hand_both"], r["hand_alone"]
        print(f"  rank {rank}: pipeline step {pc * 1e3:.1f}; its stage's work by hand "
              f"(no engine, no p2p) with both ranks busy {bc * 1e3:.1f} [{bw * 1e3:.1f}], "
              f"alone {ac * 1e3:.1f} [{aw * 1e3:.1f}]; engine + p2p {(pc - bc) * 1e3:+.1f} "
              f"({100 * (pc / bc - 1):+.1f}%), two busy cores {100 * (bc / ac - 1):+.1f}%")  # fmt: skip
    alone = max(r["hand_alone"][1] for r in ranks)
    overhead = max(r["pp"][1] / r["hand_both"][1] for r in ranks)
    share = alone / (single_cpu / P)
    print(f"  busiest stage alone / (one-rank CPU / {P}) = {share:.3f} (stage split + "
          f"microbatching; microbatching alone: {accum_cpu / single_cpu:.3f})")  # fmt: skip
    p2p = ranks[0]["p2p"]
    print(f"  gloo p2p at the boundary: {p2p * 1e3:.2f} ms per activation + gradient round "
          f"trip, {2 * m * p2p * 1e3:.1f} ms per step if none of it overlapped compute")  # fmt: skip
    # Without contention a rank's step takes its CPU time stretched by the bubble (if its
    # waits do not spin): the first estimate keeps the slowdown two busy cores cause each
    # other on this machine, the second is the step on two cores as fast as one alone.
    est = max(r["pp"][1] for r in ranks) * stretch / single_cpu
    est_alone = alone * overhead * stretch / single_cpu
    print(f"  estimate (no other load): max rank CPU x (m+p-1)/m / one-rank CPU = {est:.3f}, "
          f"{est / ideal:.3f} of ideal; with each core as fast as one alone: "
          f"{est_alone:.3f}, {est_alone / ideal:.3f} of ideal")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="hidden 64, 4 layers, seq 32")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile each rank's steps")
    args = parser.parse_args(argv)
    shape = dict(hidden=args.hidden, layers=args.layers, seq=args.seq, batch=args.batch,
                 microbatches=args.microbatches, vocab=1024)  # fmt: skip
    if args.quick:
        shape.update(hidden=64, layers=4, seq=32, batch=8, vocab=256)
        args.repeats = 2
    report(shape, args.repeats, args.profile)


if __name__ == "__main__":
    main()
