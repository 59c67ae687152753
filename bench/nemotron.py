"""Nemotron-H on CPU: our model and Mamba2 mixer vs transformers, tokens/s and ratios.

Usage: python bench/nemotron.py [--quick] [--repeats N] [--threads T] [--only mixer|model|blocks]
       python bench/nemotron.py --sweep [--quick] [--repeats N] [--threads T] [--points A,B]
       python bench/nemotron.py --only blocks [--points A,B]

Runs, in one process and on the same weights:
  (a) the Mamba2 mixer alone: am_models_nemotron.Mamba2Mixer (pure-PyTorch chunked
      SSD scan) vs transformers' NemotronHMamba2Mixer torch path;
  (b) the whole model: am_models_nemotron.NemotronHForCausalLM vs transformers'
      NemotronHForCausalLM (hidden 512, 8 layers "MEM*EM-E", 16 experts top-4,
      batch 2 x seq 1024, fp32).
  (c) per block (`--only blocks`, at the sweep points `--points` names, default base): the
      forward+backward of the first Mamba, MoE, attention and MLP mixer of both models on the
      same input, and our MoE block in parts (router, routed experts, shared experts), each
      beside the same matmuls timed alone (its floor), to show where a point's margin goes.
Each measurement is the median of interleaved repeats (ours, theirs, ours, ...; see
bench/_timing.py), so a busy machine slows both sides alike. The thread count is fixed
(`--threads`, default 1: on a shared CPU OpenMP workers spin while a sibling thread is
descheduled, which makes multi-threaded timings swing by several x). Every table reports
tokens/s and the speedup on CPU seconds (the work done, which other processes barely
change at one thread) and the speedup on wall-clock seconds, with the load average
(os.getloadavg) measured next to it. Forward is timed under no_grad; forward+backward is
one training step without the optimizer.
`--sweep` times the whole model's forward+backward at the shapes users train, varying one
axis at a time around the base point (hidden 512, seq 1024, chunk 128, 16 experts top-4;
`--tokens` per step, default 1024):
hidden 256-1024, sequence 512-4096, Mamba chunk 64-256, 8-64 experts top-2..8; it prints
one ratio per point and the smallest (one measured run: 7m27s of CPU time at one thread).
The chunk axis sets config.chunk_size on both sides; our pure-PyTorch scan runs chunks of at
most `am_models_nemotron.mamba.TORCH_SCAN_CHUNK` (64) positions whatever the config says (the
result does not depend on it), so at chunk 128 and 256 it is transformers' scan that changes.
Goals: mixer fwd+bwd >= 1.5x transformers, whole model fwd+bwd >= 1.3x (at every sweep point).
"""

from __future__ import annotations

import argparse
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


def mamba_kwargs(quick: bool) -> dict:
    return dict(
        hidden_size=256 if quick else 512,
        mamba_num_heads=8 if quick else 16,
        mamba_head_dim=64,
        ssm_state_size=64 if quick else 128,
        n_groups=4 if quick else 8,
        chunk_size=128,
        conv_kernel=4,
        dtype="float32",
    )


def model_config(quick: bool, **overrides):
    from transformers import NemotronHConfig

    kwargs = dict(
        vocab_size=2048,
        hybrid_override_pattern="MEM*EM-E",
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1024 if not quick else 512,
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=256 if not quick else 128,
        moe_shared_expert_intermediate_size=512 if not quick else 256,
        n_group=1,
        topk_group=1,
        max_position_embeddings=8192,
        **mamba_kwargs(quick),
    )
    kwargs.update(overrides)
    return NemotronHConfig(**kwargs)


def paired_models(cfg, **backend):
    """transformers' model and ours on the same weights, in train mode (ours with the
    BackendConfig fields `backend` on top of the defaults)."""
    from transformers import NemotronHForCausalLM as Theirs

    from am_dtype import BackendConfig
    from am_models_nemotron import NemotronHForCausalLM as Ours

    torch.manual_seed(0)
    hf = Theirs(cfg).float().train()
    ours = Ours.from_config(cfg, backend=BackendConfig(**backend)).float().train()
    missing = ours.load_state_dict(ours.state_dict_adapter.from_hf(hf.state_dict()), strict=False)
    if missing.missing_keys:
        raise RuntimeError(f"weights not carried over: {missing.missing_keys[:5]}")
    return hf, ours


def report(title: str, tokens: int, t: dict, clock: str) -> None:
    other = "wall" if clock == "cpu" else "cpu"
    print(f"\n{title}")
    print(f"  [{load_average()}]")
    print(
        f"  {'':20s}{'ours tok/s':>12s}{'transformers':>14s}{'speedup':>9s}"
        f"{other + ' speedup':>14s}"
    )
    for phase in ("forward", "forward+backward"):
        ours, theirs = t[f"ours {phase}"], t[f"hf {phase}"]
        print(
            f"  {phase:20s}{tokens / ours.median(clock):12.0f}{tokens / theirs.median(clock):14.0f}"
            f"{theirs.median(clock) / ours.median(clock):8.2f}x"
            f"{theirs.median(other) / ours.median(other):13.2f}x"
        )
    print(
        f"  (tokens/s and speedup on median {clock} seconds, the other on median {other} seconds)"
    )


def step_fns(name: str, module, inputs: Callable[[], dict], loss_fn) -> dict:
    def fwd():
        with torch.no_grad():
            module(**inputs())

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        loss_fn(module(**inputs())).backward()

    return {f"{name} forward": fwd, f"{name} forward+backward": fwd_bwd}


def interleave(a: dict, b: dict) -> dict:
    out = {}
    for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
        out[ka], out[kb] = va, vb
    return out


def bench_mixer(args) -> None:
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    from am_models_nemotron.mamba import Mamba2Mixer

    cfg = NemotronHConfig(
        layers_block_type=["linear_attention"], num_hidden_layers=1, **mamba_kwargs(args.quick)
    )
    torch.manual_seed(0)
    hf = NemotronHMamba2Mixer(cfg, layer_idx=0).train()
    ours = Mamba2Mixer(cfg, layer_idx=0).train()
    ours.load_state_dict(hf.state_dict(), strict=True)
    batch, seq = (1, 512) if args.quick else (2, 1024)
    x = torch.randn(batch, seq, cfg.hidden_size)
    with torch.no_grad():
        err = (ours(x) - hf(x)).abs().max() / hf(x).abs().max()
    fns = interleave(
        step_fns("ours", ours, lambda: {"hidden_states": x}, lambda y: y.square().mean()),
        step_fns("hf", hf, lambda: {"hidden_states": x}, lambda y: y.square().mean()),
    )
    t = interleaved(fns, args.repeats)
    report(
        f"Mamba2 mixer (hidden {cfg.hidden_size}, {cfg.mamba_num_heads} heads x "
        f"{cfg.mamba_head_dim}, state {cfg.ssm_state_size}, {cfg.n_groups} groups, chunk "
        f"{cfg.chunk_size}; batch {batch} x seq {seq}, fp32; max rel diff {err:.1e})",
        batch * seq,
        t,
        args.clock,
    )


def bench_model(args) -> None:
    cfg = model_config(args.quick)
    hf, ours = paired_models(cfg)
    batch, seq = (1, 512) if args.quick else (2, 1024)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        err = (ours(input_ids=ids).logits - ref).abs().max() / ref.abs().max()

    def inputs() -> dict:
        return {"input_ids": ids, "labels": ids}

    fns = interleave(
        step_fns("ours", ours, inputs, lambda out: out.loss),
        step_fns("hf", hf, inputs, lambda out: out.loss),
    )
    t = interleaved(fns, args.repeats)
    pattern = "".join(getattr(cfg, "hybrid_override_pattern", ""))
    report(
        f"Whole model (hidden {cfg.hidden_size}, layers {pattern}, {cfg.n_routed_experts} experts "
        f"top-{cfg.num_experts_per_tok}; batch {batch} x seq {seq}, fp32; max rel logit diff "
        f"{err:.1e})",
        batch * seq,
        t,
        args.clock,
    )


# Block kinds timed by --only blocks: (our block_type, transformers' block_type).
BLOCK_KINDS = (
    ("mamba", "linear_attention"),
    ("moe", "moe"),
    ("attention", "full_attention"),
    ("mlp", "mlp"),
)


def block_fns(hf, ours, x, grad) -> dict:
    """fwd+bwd of the first block of each kind, ours and transformers' (mixer only: no norm or
    residual, which are the same elementwise passes on both sides), on the same input."""
    ours_layers = list(ours.model.layers.values())
    fns = {}
    for kind, hf_kind in BLOCK_KINDS:
        ours_idx = [i for i, layer in enumerate(ours_layers) if layer.block_type == kind]
        hf_idx = [i for i, layer in enumerate(hf.model.layers) if layer.block_type == hf_kind]
        if not ours_idx or ours_idx[:1] != hf_idx[:1]:
            continue
        for name, mixer in (
            ("ours", ours_layers[ours_idx[0]].mixer),
            ("hf", hf.model.layers[hf_idx[0]].mixer),
        ):

            def fn(mixer=mixer):
                out = mixer(x.clone().requires_grad_(True))
                out = out[0] if isinstance(out, tuple) else out
                out.backward(grad)
                mixer.zero_grad(set_to_none=True)

            fns[f"{name} {kind}"] = fn
    return fns


def moe_part_fns(moe, x_TD, grad_TD) -> dict:
    """Our MoE block split into its parts (router, routed experts, shared experts), each with
    the matmuls it runs timed alone on the same shapes (routed: equal loads), its floor."""
    with torch.no_grad():
        weights_TK, indices_TK, _ = moe.gate(x_TD, None)
    mask_T = torch.ones(x_TD.shape[0], dtype=torch.bool)
    T, D = x_TD.shape
    E, K = moe.n_routed_experts, moe.n_activated_experts
    F = moe.experts.down_projs.shape[1]
    rows, gen = T * K // E, torch.Generator().manual_seed(2)
    a, h, g = (torch.randn(n, m, generator=gen) for n, m in ((rows, D), (rows, F), (rows, D)))
    w_up, w_down = torch.randn(D, F, generator=gen), torch.randn(F, D, generator=gen)
    Fs = moe.shared_experts.up_proj.weight.shape[0]
    xs, hs = torch.randn(T, D, generator=gen), torch.randn(T, Fs, generator=gen)
    ws = torch.randn(D, Fs, generator=gen)

    def gate():
        moe.zero_grad(set_to_none=True)
        w, _, _ = moe.gate(x_TD.clone().requires_grad_(True), None)
        w.backward(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))

    def routed():
        moe.zero_grad(set_to_none=True)
        x, w = x_TD.clone().requires_grad_(True), weights_TK.clone().requires_grad_(True)
        moe.experts(x, mask_T, w, indices_TK).backward(grad_TD)

    def shared():
        moe.zero_grad(set_to_none=True)
        moe.shared_experts(x_TD.clone().requires_grad_(True)).backward(grad_TD)

    # The floors run on the GEMM our layers run (`BackendConfig.cpu_gemm`: oneDNN or MKL).
    from am_dtype.cpu_gemm import cpu_mm, resolve_cpu_gemm

    kernel = resolve_cpu_gemm(moe.backend.cpu_gemm, x_TD.dtype)

    def mm(p, q):
        return cpu_mm(p, q, kernel)

    def routed_floor():  # per expert: 2 forward, 4 backward matmuls
        for _ in range(E):
            mm(a, w_up), mm(h, w_down), mm(g, w_down.t())
            mm(h.t(), g), mm(a.t(), h), mm(h, w_up.t())

    def shared_floor():
        mm(xs, ws), mm(hs, ws.t()), mm(xs, ws)
        mm(hs.t(), xs), mm(xs.t(), hs), mm(hs, ws.t())

    return {
        "router": gate,
        "routed experts": routed,
        "routed matmuls alone": routed_floor,
        "shared experts": shared,
        "shared matmuls alone": shared_floor,
    }


def bench_blocks(args) -> None:
    points = sweep_points(args.quick, args.tokens)
    for label, overrides, batch, seq in select_points(points, args.points or points[0][0]):
        cfg = model_config(args.quick, **overrides)
        hf, ours = paired_models(cfg)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, seq, cfg.hidden_size, generator=gen)
        grad = torch.randn(batch, seq, cfg.hidden_size, generator=gen)
        fns = block_fns(hf, ours, x, grad)
        moe = next(m.mixer for m in ours.model.layers.values() if m.block_type == "moe")
        parts = moe_part_fns(moe, x.view(-1, cfg.hidden_size), grad.view(-1, cfg.hidden_size))
        t = interleaved({**fns, **parts}, args.repeats)
        clock = args.clock
        print(f"\nPer-block forward+backward at '{label}' ({batch} x {seq} tokens, fp32)")
        print(f"  [{load_average()}]")
        print(f"  {'block':12s}{'ours ms':>10s}{'transformers ms':>17s}{'speedup':>9s}")
        for kind, _ in BLOCK_KINDS:
            if f"ours {kind}" in t:
                o, h = t[f"ours {kind}"].median(clock), t[f"hf {kind}"].median(clock)
                print(f"  {kind:12s}{o * 1e3:10.1f}{h * 1e3:17.1f}{h / o:8.2f}x")
        line = ", ".join(f"{name} {t[name].median(clock) * 1e3:.1f}" for name in parts)
        print(f"  our MoE block's parts, ms: {line}")
        print(f"  (median {clock} seconds; a part's 'matmuls alone' is its floor)")


def sweep_points(quick: bool, tokens: int = 1024) -> list[tuple[str, dict, int, int]]:
    """(label, config overrides, batch, seq): one axis varied at a time around the base.

    Each point runs max(1, tokens // seq) sequences, so a point at seq >= tokens is one
    sequence of that length.
    """
    if quick:
        return [("base", {}, 1, 256), ("chunk 64", {"chunk_size": 64}, 1, 256)]

    def batch(seq: int) -> int:
        return max(1, tokens // seq)

    points: list[tuple[str, dict, int, int]] = [("base", {}, batch(1024), 1024)]
    for hidden in (256, 1024):
        heads = hidden // 32
        overrides = {"hidden_size": hidden, "mamba_num_heads": heads}
        points.append((f"hidden {hidden}", overrides, batch(1024), 1024))
    for seq in (512, 2048, 4096):
        points.append((f"seq {seq}", {}, batch(seq), seq))
    for chunk in (64, 256):
        points.append((f"chunk {chunk}", {"chunk_size": chunk}, batch(1024), 1024))
    for experts, top_k in ((8, 2), (32, 4), (64, 8)):
        overrides = {"n_routed_experts": experts, "num_experts_per_tok": top_k}
        points.append((f"{experts} experts top-{top_k}", overrides, batch(1024), 1024))
    return points


def bench_sweep(args) -> None:
    from am_dtype import BackendConfig

    points = select_points(sweep_points(args.quick, args.tokens), args.points)
    print(
        "\nWhole-model forward+backward sweep (fp32; base: hidden 512, MEM*EM-E, chunk 128, "
        f"16 experts top-4, seq 1024; {args.tokens} tokens per step, or one sequence if longer)"
    )
    print(f"  [{load_average()}]")
    clock = args.clock
    other = "wall" if clock == "cpu" else "cpu"
    print(
        f"  tokens/s and speedup on median {clock} seconds; also the speedup on {other} seconds, "
        "and (MKL) ours with cpu_gemm='torch', on transformers' GEMM"
    )
    print(
        f"  {'point':22s}{'tokens':>7s}{'ours tok/s':>11s}{'transformers':>13s}{'speedup':>9s}"
        f"{other + ' speedup':>13s}{'MKL speedup':>14s}   load (1 min) at the point's end"
    )
    ratios = []
    for label, overrides, batch, seq in points:
        cfg = model_config(args.quick, **overrides)
        hf, ours = paired_models(cfg)
        # Ours on MKL's GEMMs (as transformers runs): the share of the speedup that is
        # oneDNN's GEMM on this CPU (`am_dtype.cpu_gemm`).
        mkl = type(ours).from_config(cfg, backend=BackendConfig(cpu_gemm="torch")).float().train()
        mkl.load_state_dict(ours.state_dict())
        ids = torch.randint(
            0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)
        )

        def inputs(ids=ids) -> dict:
            return {"input_ids": ids, "labels": ids}

        fns = {
            "ours": step_fns("ours", ours, inputs, lambda out: out.loss)["ours forward+backward"],
            "hf": step_fns("hf", hf, inputs, lambda out: out.loss)["hf forward+backward"],
            "mkl": step_fns("mkl", mkl, inputs, lambda out: out.loss)["mkl forward+backward"],
        }
        t = interleaved(fns, args.repeats)
        tokens = batch * seq
        ours_s, hf_s = t["ours"].median(clock), t["hf"].median(clock)
        ratio, other_ratio = hf_s / ours_s, t["hf"].median(other) / t["ours"].median(other)
        mkl_ratio = hf_s / t["mkl"].median(clock)
        ratios.append((ratio, other_ratio, label))
        print(
            f"  {label:22s}{tokens:7d}{tokens / ours_s:11.0f}{tokens / hf_s:13.0f}"
            f"{ratio:8.2f}x{other_ratio:12.2f}x{mkl_ratio:13.2f}x   {load_1min()}",
            flush=True,
        )
        del hf, ours, mkl
    worst = min(ratios)
    worst_other = min(ratios, key=lambda r: r[1])
    print(
        f"  smallest speedup: {worst[0]:.2f}x at {worst[2]} ({clock} seconds; on {other} "
        f"seconds: {worst_other[1]:.2f}x at {worst_other[2]}) (goal >= 1.3x at every point)"
    )
    print(f"  [{load_average()}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per function")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (fixed for the run)"
    )
    parser.add_argument("--only", choices=("mixer", "model", "blocks"), default=None)
    parser.add_argument(
        "--sweep", action="store_true", help="whole-model fwd+bwd ratio over a shape sweep"
    )
    parser.add_argument(
        "--points", default=None, help="--sweep, --only blocks: comma-separated point labels"
    )
    parser.add_argument(
        "--tokens", type=int, default=1024, help="--sweep: tokens per step (batch x seq)"
    )
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
        f"ratios on {args.clock} seconds"
    )
    if args.sweep:
        bench_sweep(args)
        return
    if args.only in (None, "mixer"):
        bench_mixer(args)
    if args.only in (None, "model"):
        bench_model(args)
    if args.only in (None, "blocks"):
        bench_blocks(args)


if __name__ == "__main__":
    main()
