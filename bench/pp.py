"""Pipeline step time: a 2-stage 1F1B pipeline (am_pp on torch.distributed.pipelining) vs one rank.

Two gloo ranks, each pinned to its own core with one intra-op thread, run one training step
(forward + backward over the global batch, 8 microbatches) of a Llama-shaped transformers
model split into 2 stages; rank 0 also times the same model on the same global batch alone
(one process, one thread, one forward + backward), interleaved repeat by repeat with the
pipeline steps so both see the same machine load. Medians are reported, with the load
average before and after, and each timing's process CPU time: on a shared machine a CPU
share (CPU / wall) well under 1 means the process waited for a core. From the CPU times the
bench also estimates the ratio without contention, and times the model alone over the same
8 sequential microbatches (gradient accumulation) to show what microbatching itself costs.

The ideal pipeline time is the per-stage share of the work stretched by the bubble:
T_pp / T_1 = (1/p) * (m + p - 1) / m, i.e. 1/p of the work plus the bubble, which is
(p - 1) / (m + p - 1) of the pipeline step (0.5625 for p = 2, m = 8).

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


def rank_times(rank: int, world: int, shape: dict, repeats: int, profile: bool) -> dict:
    from am_pp import pipeline_model

    cores = _pin(rank)
    model = _model(shape["hidden"], shape["layers"], shape["vocab"])
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]),
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    pp = pipeline_model(model, None, "1F1B", shape["microbatches"])
    pp_times, single_times, accum_times = [], [], []
    profiler = cProfile.Profile() if profile else None

    def pp_step():
        pp.step(ids, ids)
        dist.barrier()

    for i in range(repeats + 1):  # the first round warms up (shape inference, allocator)
        dist.barrier()
        if rank == 0:
            single_times.append(_timed(lambda: _single_step(model, ids)))
            model.zero_grad(set_to_none=True)
            accum_times.append(_timed(lambda: _single_step(model, ids, shape["microbatches"])))
            model.zero_grad(set_to_none=True)
        dist.barrier()
        if profiler is not None and i > 0:
            profiler.enable()
        pp_times.append(_timed(pp_step))
        if profiler is not None and i > 0:
            profiler.disable()
        for p in pp.parameters():
            p.grad = None
    return {
        "cores": cores,
        "pp": _medians(pp_times),
        "single": _medians(single_times),
        "accum": _medians(accum_times),
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


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def report(shape: dict, repeats: int, profile: bool) -> None:
    from am_dtype.testing import run_distributed

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = _load()
    first, last = run_distributed(rank_times, P, shape, repeats, profile, timeout_s=1200)
    load_after = _load()
    m = shape["microbatches"]
    ideal = (1 / P) * (m + P - 1) / m
    (pp_wall, pp_cpu0), (_, pp_cpu1) = first["pp"], last["pp"]
    single_wall, single_cpu = first["single"]
    accum_wall, accum_cpu = first["accum"]
    ratio = pp_wall / single_wall
    mask = last["mask"]
    mb_time = pp_wall / m
    print(f"shape: {shape}; 2 gloo ranks x 1 thread, pinned to cores {first['cores']} and "
          f"{last['cores']} of {os.cpu_count()}; median of {repeats} interleaved repeats")  # fmt: skip
    print(f"load average (1/5/15 min) before: {load_before}; after: {load_after}")
    print("wall ms (CPU ms; CPU share < 1: the process waited for a core or its peer):")
    print(f"  one rank, one thread, whole batch fwd+bwd:     {single_wall * 1e3:9.1f} "
          f"({single_cpu * 1e3:.1f}; share {single_cpu / single_wall:.2f})")  # fmt: skip
    print(f"  one rank, {m} sequential microbatches (accum):  {accum_wall * 1e3:9.1f} "
          f"({accum_cpu * 1e3:.1f}; share {accum_cpu / accum_wall:.2f})")  # fmt: skip
    print(f"  2-stage 1F1B, {m} microbatches, step:          {pp_wall * 1e3:9.1f} "
          f"(rank 0 {pp_cpu0 * 1e3:.1f}, rank 1 {pp_cpu1 * 1e3:.1f}; shares "
          f"{pp_cpu0 / pp_wall:.2f}, {pp_cpu1 / pp_wall:.2f})")  # fmt: skip
    print(f"ratio pipeline / one rank: {ratio:.3f}; ideal (1/{P}) * (m+p-1)/m = {ideal:.4f} "
          f"(bubble (p-1)/(m+p-1) = {(P - 1) / (m + P - 1):.3f}); "
          f"ratio / ideal = {ratio / ideal:.3f} (goal <= 1.10)")  # fmt: skip
    # Without contention a rank's step takes its CPU time stretched by the bubble (if its
    # waits do not spin); this estimate separates our overheads from the machine's load.
    est = max(pp_cpu0, pp_cpu1) * (m + P - 1) / m / single_cpu
    print(f"CPU-time estimate (no contention): max rank CPU x (m+p-1)/m / one-rank CPU = "
          f"{est:.3f}, {est / ideal:.3f} of ideal; microbatching alone costs "
          f"{accum_cpu / single_cpu:.3f}x the one-rank CPU time")  # fmt: skip
    saved = mask["build"] - mask["hit"]
    print(f"mask cache: build {mask['build'] * 1e6:.1f} us, hit {mask['hit'] * 1e6:.2f} us per "
          f"microbatch per stage; saves {saved * 1e6:.1f} us per microbatch "
          f"({100 * saved / mb_time:.2f}% of a microbatch's share of the step)")  # fmt: skip
    if profile:
        for rank, result in enumerate((first, last)):
            print(f"--- rank {rank} pipeline steps, top functions by own time {result['profile']}")


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
