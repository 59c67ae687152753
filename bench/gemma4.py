"""Gemma 4 MoE on CPU: our model and MoE block vs transformers', tokens/s and ratios.

Usage: python bench/gemma4.py [--quick] [--config small|a4b] [--repeats N] [--threads T]
                              [--clock cpu|wall]
       python bench/gemma4.py --sweep [--quick] [--repeats N] [--points A,B]

Runs, in one process and on the same weights (fp32, train mode):
  (0) the machine's dense fp32 matmul rate (GFLOP/s), torch mm (MKL) and oneDNN: the ceiling;
  (a) the MoE block alone: am_models_gemma4.Gemma4MoE (am-moe grouped experts, "torch_mm")
      vs transformers' Gemma4TextRouter + Gemma4TextExperts, in the experts implementation
      transformers picks by default and in its "eager" per-expert loop;
  (b) the whole MoE text model: am_models_gemma4.Gemma4ForConditionalGeneration vs
      transformers' Gemma4ForConditionalGeneration in both experts implementations.
`--config small` (the default): hidden 512, 4 layers sliding/full, 16 experts top-4, batch
2 x seq 512 = 1024 tokens, window 256. `--config a4b`: gemma-4-26B-A4B's proportions at
hidden 512 (expert hidden 1/4 and dense MLP 3/4 of hidden, 128 experts top-8, 5 sliding
layers per full one, k_eq_v full layers), batch 1 x seq 2048, window 512; the vocabulary
stays 2048 (at the released 262144 the shared lm_head would be most of the step).
Each measurement is the median of interleaved repeats in a rotating order (bench/_timing.py),
so a busy machine slows every case alike. The thread count is fixed (`--threads`, default 1:
on a shared CPU, OpenMP workers spin while a sibling thread is descheduled, which swings
multi-threaded timings by several x); at one thread the ratios are taken on CPU seconds (the
work done, which other processes barely change), else on wall seconds; the load average is
printed beside every table. Forward runs under no_grad; forward+backward is one training step
without the optimizer. Goal: whole model forward+backward >= 1.5x transformers' best.

`--sweep` times the whole model's forward+backward against transformers' default experts
implementation over MoE shapes from `small` to `a4b`, one axis at a time (experts, top-k,
expert hidden, tokens), and prints beside each ratio the bound that matmuls set: one profiled
step of ours gives the time spent inside matmul kernels, and transformers' step divided by it
is the speedup ours would reach if everything but its matmuls took no time. Where that bound
is under 1.5x, no implementation doing the same matmuls at this rate reaches the goal.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from _timing import (
    CLOCKS,
    default_clock,
    fix_threads,
    interleaved,
    load_1min,
    load_average,
    select_points,
)

warnings.filterwarnings("ignore")


def text_config(quick: bool, config: str = "small", **overrides) -> dict:
    """The bench's Gemma 4 MoE text config; `overrides` replace single fields (the sweep)."""
    return {**_base_text_config(quick, config), **overrides}


def _base_text_config(quick: bool, config: str) -> dict:
    if config == "a4b":
        layers = ["sliding_attention"] * 5 + ["full_attention"]
        if quick:
            layers = ["sliding_attention"] * 2 + ["full_attention"]
        return dict(
            vocab_size=2048,
            hidden_size=512,
            intermediate_size=384,
            num_hidden_layers=len(layers),
            layer_types=layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            global_head_dim=128,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            sliding_window=512,
            enable_moe_block=True,
            num_experts=128,
            top_k_experts=8,
            moe_intermediate_size=128,
            hidden_size_per_layer_input=0,
            final_logit_softcapping=30.0,
            dtype="float32",
        )
    layers = ["sliding_attention", "full_attention"] * (1 if quick else 2)
    return dict(
        vocab_size=2048,
        hidden_size=256 if quick else 512,
        intermediate_size=512 if quick else 1024,
        num_hidden_layers=len(layers),
        layer_types=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32 if quick else 64,
        global_head_dim=64 if quick else 128,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=128 if quick else 256,
        enable_moe_block=True,
        num_experts=16,
        top_k_experts=4,
        moe_intermediate_size=128 if quick else 256,
        hidden_size_per_layer_input=0,
        final_logit_softcapping=30.0,
        dtype="float32",
    )


def gemma4_config(quick: bool, config: str = "small", **overrides):
    from transformers import Gemma4Config

    return Gemma4Config(
        text_config=text_config(quick, config, **overrides),
        vision_config=None,
        audio_config=None,
        dtype="float32",
    )


def median_times(fns: dict[str, Callable[[], None]], repeats: int, clock: str) -> dict:
    """Median seconds per call of each fn on `clock`, calling them interleaved."""
    return {name: t.median(clock) for name, t in interleaved(fns, repeats).items()}


def step_fns(name: str, run: Callable[[], torch.Tensor], params) -> dict:
    """Forward (no_grad) and forward+backward of `run() -> loss`."""

    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        for p in params:
            p.grad = None
        run().backward()

    return {f"{name} forward": fwd, f"{name} forward+backward": fwd_bwd}


def report(title: str, tokens: int, t: dict[str, float], names: list[str]) -> float:
    """Print tokens/s per case and ours/their ratios; return ours vs the best reference (fwd+bwd)."""
    print(f"\n{title}\n  {load_average()}")
    header = "".join(f"{n:>22s}" for n in names)
    print(f"  {'tokens/s':18s}{header}   speedup vs each reference")
    best = 0.0
    for phase in ("forward", "forward+backward"):
        rates = [tokens / t[f"{n} {phase}"] for n in names]
        ratios = [t[f"{n} {phase}"] / t[f"{names[0]} {phase}"] for n in names[1:]]
        cells = "".join(f"{r:22.0f}" for r in rates)
        print(f"  {phase:18s}{cells}   " + "  ".join(f"{x:.2f}x" for x in ratios))
        if phase == "forward+backward":
            best = min(ratios)
    return best


def bench_ceiling(quick: bool, repeats: int, clock: str) -> None:
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    fns = {"mm": lambda: a @ b}
    if torch.backends.mkldnn.is_available():  # oneDNN's GEMM, which our CPU fp32 matmuls use
        fns["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    t = median_times(fns, repeats, clock)
    rates = ", ".join(f"{k} {2 * n**3 / v / 1e9:.1f}" for k, v in t.items())
    print(f"\nceiling: dense matmul fp32 {n}x{n}, GFLOP/s: {rates}")


def paired_models(quick: bool, config: str = "small", **overrides):
    """transformers' model (default experts implementation) and ours on the same weights."""
    from transformers import Gemma4ForConditionalGeneration as Theirs

    from am_dtype.backend import BackendConfig
    from am_models_gemma4 import Gemma4ForConditionalGeneration as Ours

    torch.manual_seed(0)
    hf = Theirs(gemma4_config(quick, config, **overrides)).float().train()
    ours = Ours(
        gemma4_config(quick, config, **overrides),
        backend=BackendConfig(attn="sdpa", experts="torch_mm"),
    )
    ours.load_state_dict(ours.state_dict_adapter.from_hf(hf.state_dict()), strict=True)
    return hf, ours.train()


def bench_moe_block(args, hf) -> None:
    from am_dtype.backend import BackendConfig
    from am_models_gemma4 import Gemma4MoE, gemma4_moe_config

    layer = hf.model.language_model.layers[0]
    config = hf.config.text_config
    ours = Gemma4MoE(gemma4_moe_config(config), BackendConfig(experts="torch_mm"), config)
    native = hf.state_dict()
    prefix = "model.language_model.layers.0."
    ours.gate.load_state_dict(
        {
            k[len(prefix + "router.") :]: v
            for k, v in native.items()
            if k.startswith(prefix + "router.")
        }
    )
    with torch.no_grad():
        ours.experts.gate_and_up_projs.copy_(layer.experts.gate_up_proj.transpose(1, 2))
        ours.experts.down_projs.copy_(layer.experts.down_proj.transpose(1, 2))
    tokens = 512 if args.quick else 2048
    gen = torch.Generator().manual_seed(1)
    # Inputs need their gradients, as inside the model (the backward computes dX too).
    residual = torch.randn(tokens, config.hidden_size, generator=gen).requires_grad_()
    normed = torch.randn(tokens, config.hidden_size, generator=gen).requires_grad_()
    probe = torch.randn(tokens, config.hidden_size, generator=gen)

    def theirs() -> torch.Tensor:
        _, w, idx = layer.router(residual)
        return (layer.experts(normed, idx, w) * probe).sum()

    def mine() -> torch.Tensor:
        return (ours(normed, gate_input=residual) * probe).sum()

    with torch.no_grad():
        err = abs(mine() - theirs()).item() / abs(theirs()).item()
    default = hf.config.text_config._experts_implementation
    fns = dict(step_fns("ours", mine, list(ours.parameters())))
    fns.update(step_fns(f"hf {default}", theirs, list(layer.parameters())))

    def eager() -> torch.Tensor:
        hf.set_experts_implementation("eager")
        try:
            return theirs()
        finally:
            hf.set_experts_implementation(default)

    fns.update(step_fns("hf eager", eager, list(layer.parameters())))
    t = median_times(fns, args.repeats, args.clock)
    report(
        f"MoE block alone (router + {config.num_experts} experts top-{config.top_k_experts}, "
        f"dim {config.hidden_size}, expert hidden {config.moe_intermediate_size}; {tokens} "
        f"tokens, fp32; rel diff {err:.1e})",
        tokens,
        t,
        ["ours", f"hf {default}", "hf eager"],
    )


def bench_model(args, hf, ours) -> None:
    if args.config == "a4b":
        batch, seq = (1, 1024) if args.quick else (1, 2048)
    else:
        batch, seq = (1, 256) if args.quick else (2, 512)
    cfg = hf.config.text_config
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        err = ((ours(input_ids=ids).logits - ref).norm() / ref.norm()).item()
    default = cfg._experts_implementation

    def run(model, impl=None):
        def loss() -> torch.Tensor:
            if impl is not None:
                model.set_experts_implementation(impl)
            try:
                return model(input_ids=ids, labels=ids, use_cache=False).loss
            finally:
                if impl is not None:
                    model.set_experts_implementation(default)

        return loss

    # Ours with cpu_gemm="torch": MKL's GEMMs (as transformers uses) and torch's sdpa, to show
    # how much of the speedup is oneDNN's GEMM on this CPU (`am_dtype.cpu_gemm`).
    from am_dtype.backend import BackendConfig

    mkl = type(ours)(
        ours.config, backend=BackendConfig(attn="sdpa", experts="torch_mm", cpu_gemm="torch")
    )
    mkl.load_state_dict(ours.state_dict(), strict=True)
    mkl.train()
    fns = dict(step_fns("ours", run(ours), list(ours.parameters())))
    fns.update(step_fns(f"hf {default}", run(hf), list(hf.parameters())))
    fns.update(step_fns("hf eager", run(hf, "eager"), list(hf.parameters())))
    fns.update(step_fns("ours torch gemm", run(mkl), list(mkl.parameters())))
    t = median_times(fns, args.repeats, args.clock)
    best = report(
        f"Whole MoE text model (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_experts} experts top-{cfg.top_k_experts}, window {cfg.sliding_window}; "
        f"batch {batch} x seq {seq}, fp32; "
        f"rel logit diff {err:.1e})",
        batch * seq,
        t,
        ["ours", f"hf {default}", "hf eager"],
    )
    print(f"  goal fwd+bwd >= 1.5x transformers' best: {best:.2f}x")
    phase = "forward+backward"
    hf_best = min(t[f"hf {default} {phase}"], t[f"hf eager {phase}"])
    print(
        f"  ours with cpu_gemm='torch' (MKL GEMMs, torch sdpa): {phase} "
        f"{batch * seq / t[f'ours torch gemm {phase}']:.0f} tokens/s, "
        f"{hf_best / t[f'ours torch gemm {phase}']:.2f}x transformers' best"
    )


# Kernels doing the model's matrix products (their self time is the matmul time of a step).
# mkldnn::_linear_pointwise: oneDNN's GEMM (our linears, attention and experts on CPU fp32).
MATMUL_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::_grouped_mm",
        "mkldnn::_linear_pointwise",
    }
)


def sweep_points(quick: bool) -> list[tuple[str, str, dict, int, int]]:
    """(label, config, text-config overrides, batch, seq): one MoE axis varied at a time."""
    if quick:
        return [
            ("small", "small", {}, 1, 256),
            ("64 experts top-8 h64", "small", dict(num_experts=64, top_k_experts=8,
                                                    moe_intermediate_size=64), 1, 256),
        ]  # fmt: skip
    return [
        ("small", "small", {}, 2, 512),
        ("tokens 2048", "small", {}, 4, 512),
        ("top-8", "small", dict(top_k_experts=8), 2, 512),
        ("expert hidden 128", "small", dict(moe_intermediate_size=128), 2, 512),
        ("32 experts", "small", dict(num_experts=32), 2, 512),
        ("64 experts", "small", dict(num_experts=64), 2, 512),
        ("128 experts top-8 h128", "small", dict(num_experts=128, top_k_experts=8,
                                                  moe_intermediate_size=128), 2, 512),
        ("a4b", "a4b", {}, 1, 2048),
    ]  # fmt: skip


def matmul_share(step: Callable[[], None]) -> float:
    """Fraction of one profiled call of `step` spent inside matmul kernels (their self time).

    A fraction of the same profiled call, so the profiler's own per-op cost, which inflates
    the whole call, only lowers it: the bound derived from it errs high, never low.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
    mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e6
    return mm / total


def bench_sweep(args) -> None:
    points = select_points(sweep_points(args.quick), args.points)
    print(
        "\nWhole MoE text model forward+backward sweep (fp32; small: hidden 512, 4 layers, "
        "16 experts top-4, expert hidden 256, 2 x 512 tokens; a4b: see --config a4b)"
    )
    print(f"  [{load_average()}]")
    clock = args.clock
    print(
        f"  speedup = transformers (its default experts implementation) / ours on median "
        f"{clock} seconds; bound = transformers / ours' time inside matmul kernels"
    )
    print(
        f"  {'point':24s}{'rows/expert':>12s}{'ours tok/s':>11s}{'transformers':>13s}"
        f"{'speedup':>9s}{'matmul share':>13s}{'bound':>8s}   load (1 min)"
    )
    ratios, implementations = [], set()
    for label, config, overrides, batch, seq in points:
        hf, ours = paired_models(args.quick, config, **overrides)
        cfg = hf.config.text_config
        implementations.add(cfg._experts_implementation)
        ids = torch.randint(
            0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(2)
        )

        def step(model, ids=ids) -> Callable[[], None]:
            params = list(model.parameters())

            def fwd_bwd() -> None:
                for p in params:
                    p.grad = None
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

            return fwd_bwd

        t = median_times({"ours": step(ours), "hf": step(hf)}, args.repeats, clock)
        share = matmul_share(step(ours))
        tokens = batch * seq
        ratio = t["hf"] / t["ours"]
        ratios.append((ratio, label))
        rows = tokens * cfg.top_k_experts // cfg.num_experts
        print(
            f"  {label:24s}{rows:12d}{tokens / t['ours']:11.0f}{tokens / t['hf']:13.0f}"
            f"{ratio:8.2f}x{100 * share:12.0f}%{t['hf'] / (share * t['ours']):7.2f}x   {load_1min()}",
            flush=True,
        )
        del hf, ours
    worst = min(ratios)
    held = [label for ratio, label in ratios if ratio >= 1.5]
    print(
        f"  smallest speedup: {worst[0]:.2f}x at {worst[1]}; >= 1.5x at: "
        f"{', '.join(held) if held else 'no point'} (goal >= 1.5x transformers' best)"
    )
    print(f"  transformers' experts implementation: {', '.join(sorted(implementations))}")
    print(f"  [{load_average()}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument(
        "--config", choices=("small", "a4b"), default="small", help="model shape (see above)"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="whole-model fwd+bwd ratio over MoE shapes"
    )
    parser.add_argument("--points", default=None, help="--sweep: comma-separated point labels")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per function")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (fixed)")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default=None,
        help="what the ratios are taken on (default: cpu at one thread, else wall)",
    )
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick or args.sweep else 7
    fix_threads(args.threads)
    args.clock = args.clock or default_clock(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads (fixed), {args.repeats} interleaved repeats (median), "
        f"ratios on {args.clock} seconds, config {args.config}"
    )
    if args.sweep:
        bench_sweep(args)
        return
    bench_ceiling(args.quick, args.repeats, args.clock)
    hf, ours = paired_models(args.quick, args.config)
    bench_moe_block(args, hf)
    bench_model(args, hf, ours)


if __name__ == "__main__":
    main()
