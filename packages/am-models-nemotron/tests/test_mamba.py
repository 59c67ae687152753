"""Mamba2 mixer: parity with transformers' torch path, packing, padding, decoding, kernels."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

from am_models_nemotron import ssd
from am_models_nemotron.mamba import HAVE_MAMBA_SSM, Mamba2Mixer, MambaState

transformers.logging.set_verbosity_error()

RTOL = 1e-5  # fp32: error relative to the largest magnitude of the compared tensor


def make_config(**overrides) -> NemotronHConfig:
    kwargs = dict(
        hidden_size=32,
        mamba_num_heads=4,
        mamba_head_dim=8,
        ssm_state_size=8,
        n_groups=2,
        chunk_size=8,
        conv_kernel=4,
        layers_block_type=["linear_attention"],
        num_hidden_layers=1,
        dtype="float32",
    )
    kwargs.update(overrides)
    return NemotronHConfig(**kwargs)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values for every parameter, so each one is exercised by the comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name in ("D", "norm.weight"):
                p.copy_(1 + 0.3 * noise)
            elif name == "A_log":
                p.copy_(0.5 * noise)
            elif name == "dt_bias":
                p.copy_(noise)
                p[0] = -9.0  # softplus below time_step_min: exercises the dt clamp
            else:
                p.copy_(0.3 * noise)


def make_pair(seed: int = 0, **overrides) -> tuple[NemotronHMamba2Mixer, Mamba2Mixer]:
    cfg = make_config(**overrides)
    torch.manual_seed(seed)
    ref = NemotronHMamba2Mixer(cfg, layer_idx=0)
    randomize(ref, seed)
    ours = Mamba2Mixer(cfg, layer_idx=0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def forward_backward(module, x, grad_out, **kwargs):
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, **kwargs)
    out.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return out.detach(), x.grad, grads


# --------------------------------------------------------------------------- parity with HF


@pytest.mark.parametrize("seq_len", [21, 32])
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("use_conv_bias", [True, False])
def test_matches_transformers_outputs_and_gradients(seq_len, padded, use_conv_bias):
    ref, ours = make_pair(seed=seq_len, use_conv_bias=use_conv_bias)
    ref.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, seq_len, 32, generator=gen)
    grad_out = torch.randn(3, seq_len, 32, generator=gen)
    mask = None
    if padded:
        mask = torch.ones(3, seq_len)
        mask[0, :5] = 0  # left padding
        mask[1, seq_len - 6 :] = 0  # right padding
    out_ref, dx_ref, g_ref = forward_backward(ref, x, grad_out, attention_mask=mask)
    out, dx, g = forward_backward(ours, x, grad_out, attention_mask=mask)
    assert rel_err(out, out_ref) < RTOL
    assert rel_err(dx, dx_ref) < RTOL
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < RTOL, name


def test_matches_transformers_with_projection_bias():
    ref, ours = make_pair(seed=3, use_bias=True)
    x = torch.randn(2, 19, 32)
    grad_out = torch.randn(2, 19, 32)
    out_ref, dx_ref, g_ref = forward_backward(ref, x, grad_out)
    out, dx, g = forward_backward(ours, x, grad_out)
    assert {"in_proj.bias", "out_proj.bias"} <= g.keys()
    assert rel_err(out, out_ref) < RTOL and rel_err(dx, dx_ref) < RTOL
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < RTOL, name


def test_parameter_names_and_shapes_match_transformers():
    ref, ours = make_pair()
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_shapes


# --------------------------------------------------------------------------- scan vs recurrence


def sequential_reference(x, dt, A, B, C, D, initial=None, seq_idx=None):
    """Token-by-token recurrence in float64: the definition the chunked scan must reproduce."""
    Bt, S, H, P = x.shape
    G, N = B.shape[-2:]
    rep = H // G
    x, dt, A, B, C, D = (t.double() for t in (x, dt, A, B, C, D))
    B_h, C_h = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)
    h = torch.zeros(Bt, H, P, N, dtype=torch.float64) if initial is None else initial.double()
    ys = []
    for t in range(S):
        decay = torch.exp(dt[:, t] * A)  # [Bt, H]
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None]
        h = (
            h * decay[..., None, None]
            + (dt[:, t, :, None] * x[:, t])[..., None] * B_h[:, t, :, None]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_h[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1), h


def random_scan_inputs(Bt=2, S=37, H=4, P=3, G=2, N=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(Bt, S, H, P, generator=gen)
    dt = torch.rand(Bt, S, H, generator=gen) * 0.5 + 0.01
    A = -torch.rand(H, generator=gen) * 2 - 0.1
    B = torch.randn(Bt, S, G, N, generator=gen)
    C = torch.randn(Bt, S, G, N, generator=gen)
    D = torch.randn(H, generator=gen)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 64])
def test_chunk_scan_equals_sequential_recurrence(chunk_size):
    x, dt, A, B, C, D = random_scan_inputs()
    initial = torch.randn(2, 4, 3, 5)
    seq_idx = torch.tensor([[0] * 9 + [1] * 20 + [2] * 8, [0] * 37], dtype=torch.int32)
    for init, idx in ((None, None), (initial, None), (initial, seq_idx)):
        y_ref, h_ref = sequential_reference(x, dt, A, B, C, D, init, idx)
        y, h = ssd.ssd_chunk_scan(x, dt, A, B, C, chunk_size, D, init, idx)
        assert rel_err(y.double(), y_ref) < RTOL
        assert rel_err(h.double(), h_ref) < RTOL


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 64])
@pytest.mark.parametrize("heads_groups", [(4, 2), (4, 4)], ids=["R2", "R1"])
def test_chunk_scan_gradients_equal_sequential_recurrence(chunk_size, heads_groups):
    # The scan's hand-written backward against autograd through the token-by-token
    # recurrence, in float64, for every input (x, dt, A, B, C, D, the initial state) and
    # both outputs (y and the final state), with and without packing, skip term and a
    # ragged last chunk.
    H, G = heads_groups
    gen = torch.Generator().manual_seed(chunk_size)
    seq_idx = torch.tensor([[0] * 9 + [1] * 20 + [2] * 8, [0] * 37], dtype=torch.int32)
    for use_init, idx, use_d in ((False, None, True), (True, None, False), (True, seq_idx, True)):
        x, dt, A, B, C, D = (
            t.double().requires_grad_(True) for t in random_scan_inputs(H=H, G=G, seed=H + G)
        )
        init = torch.randn(2, H, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        init = init if use_init else None
        inputs = [x, dt, A, B, C] + ([D] if use_d else []) + ([init] if use_init else [])
        grad_y = torch.randn(2, 37, H, 3, generator=gen, dtype=torch.float64)
        grad_h = torch.randn(2, H, 3, 5, generator=gen, dtype=torch.float64)
        y, h = ssd.ssd_chunk_scan(x, dt, A, B, C, chunk_size, D if use_d else None, init, idx)
        got = torch.autograd.grad((y * grad_y).sum() + (h * grad_h).sum(), inputs)
        D_ref = D if use_d else torch.zeros_like(D)
        y_ref, h_ref = sequential_reference(x, dt, A, B, C, D_ref, init, idx)
        want = torch.autograd.grad((y_ref * grad_y).sum() + (h_ref * grad_h).sum(), inputs)
        assert rel_err(y, y_ref) < 1e-12 and rel_err(h, h_ref) < 1e-12
        for g, g_ref in zip(got, want, strict=True):
            assert rel_err(g, g_ref) < 1e-12


def test_torch_path_scans_long_chunks_in_shorter_ones():
    # The pure-PyTorch path runs configs with chunks longer than TORCH_SCAN_CHUNK in
    # chunks of that length: outputs and gradients stay those of transformers' scan at the
    # config's chunk size.
    from am_models_nemotron.mamba import TORCH_SCAN_CHUNK

    chunk = 2 * TORCH_SCAN_CHUNK
    ref, ours = make_pair(seed=4, chunk_size=chunk)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, chunk + 23, 32, generator=gen)
    grad_out = torch.randn(2, chunk + 23, 32, generator=gen)
    out_ref, dx_ref, g_ref = forward_backward(ref, x, grad_out)
    out, dx, g = forward_backward(ours, x, grad_out)
    assert rel_err(out, out_ref) < RTOL and rel_err(dx, dx_ref) < RTOL
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < RTOL, name


def test_decode_step_equals_recurrence():
    x, dt, A, B, C, D = random_scan_inputs(S=6)
    _, h_ref = sequential_reference(x, dt, A, B, C, D)
    state = torch.zeros(2, 4, 3, 5)
    ys = [ssd.ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(6)]
    y_ref, _ = sequential_reference(x, dt, A, B, C, D)
    assert rel_err(torch.stack(ys, 1).double(), y_ref) < RTOL
    assert rel_err(state.double(), h_ref) < RTOL


def test_conv_gradients_match_autograd_conv1d():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 4 + [1] * 7, [0] * 2 + [1] * 2 + [2] * 7])
    assert torch.autograd.gradcheck(lambda *a: ssd.causal_conv1d_silu(*a, seq_idx), (x, w, b))
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], b, padding=3, groups=6)
    ref = torch.nn.functional.silu(ref[..., :11]).transpose(1, 2)
    assert rel_err(ssd.causal_conv1d_silu(x, w, b), ref) < 1e-12


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seq_len", [1, 3, 4, 70, 200])
def test_unpacked_conv_gradients_match_conv1d_on_strided_input(seq_len, bias):
    # Lengths below, at and past K and across several weight-gradient blocks (with a
    # ragged last one); x is a column slice like the in_proj output the mixer passes. The
    # backward recomputes the pre-activation (bias included) block by block.
    gen = torch.Generator().manual_seed(seq_len)
    full = torch.randn(2, seq_len, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    grad = torch.randn(2, seq_len, 6, generator=gen, dtype=torch.float64)
    x = full[..., 2:8]
    out = ssd.causal_conv1d_silu(x, w, b)
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], b, padding=3, groups=6)
    ref = torch.nn.functional.silu(ref[..., :seq_len]).transpose(1, 2)
    inputs = (full, w, b) if bias else (full, w)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    assert rel_err(out, ref) < 1e-12
    for g, g_ref in zip(got, want, strict=True):
        assert rel_err(g, g_ref) < 1e-12


def test_scan_and_norm_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.rand(*shape, generator=gen, dtype=torch.float64) * scale + shift
        return t.requires_grad_(True)

    x, B, C, init = rnd(1, 7, 4, 2, shift=-0.5), rnd(1, 7, 2, 3), rnd(1, 7, 2, 3), rnd(1, 4, 2, 3)
    dt, A, D = rnd(1, 7, 4, scale=0.5, shift=0.05), rnd(4, shift=-1.5), rnd(4)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])

    def scan(x, dt, A, B, C, D, init):
        return ssd.ssd_chunk_scan(x, dt, A, B, C, 3, D, init, seq_idx)

    assert torch.autograd.gradcheck(scan, (x, dt, A, B, C, D, init))
    y, z, w = rnd(2, 3, 8, shift=-0.5), rnd(2, 3, 8, shift=-0.5), rnd(8, shift=0.5)
    assert torch.autograd.gradcheck(lambda *a: ssd.gated_rms_norm(*a, 4, 1e-5), (y, z, w))


# --------------------------------------------------------------------------- mixer behaviour


def test_chunk_size_invariance():
    outs, grads = [], []
    x = torch.randn(2, 29, 32)
    grad_out = torch.randn(2, 29, 32)
    for chunk in (4, 8, 13, 64):
        _, ours = make_pair(seed=5, chunk_size=chunk)
        out, dx, _ = forward_backward(ours, x, grad_out)
        outs.append(out)
        grads.append(dx)
    for out, dx in zip(outs[1:], grads[1:], strict=True):
        assert rel_err(out, outs[0]) < RTOL and rel_err(dx, grads[0]) < RTOL


def test_packed_sequences_equal_separate_runs():
    _, ours = make_pair(seed=7)
    lengths = [5, 14, 11]  # boundaries fall inside chunks and inside the conv window
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randn(1, n, 32, generator=gen) for n in lengths]
    grads = [torch.randn(1, n, 32, generator=gen) for n in lengths]
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])
    packed_out, packed_dx, _ = forward_backward(
        ours, torch.cat(seqs, 1), torch.cat(grads, 1), seq_idx=seq_idx[None]
    )
    start = 0
    for seq, grad, n in zip(seqs, grads, lengths, strict=True):
        out, dx, _ = forward_backward(ours, seq, grad)
        assert rel_err(packed_out[:, start : start + n], out) < RTOL
        assert rel_err(packed_dx[:, start : start + n], dx) < RTOL
        start += n


def test_padding_does_not_change_real_tokens_or_state():
    _, ours = make_pair(seed=9)
    x = torch.randn(1, 13, 32)
    alone_state = ours.empty_state(1)
    alone = ours(x, state=alone_state)
    pad = torch.randn(1, 4, 32) * 5
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 13)], dim=1)
    left = ours(torch.cat([pad, x], 1), attention_mask=mask)
    assert rel_err(left[:, 4:], alone) < RTOL
    right_state = ours.empty_state(1)
    right = ours(torch.cat([x, pad], 1), attention_mask=mask.flip(1), state=right_state)
    assert rel_err(right[:, :13], alone) < RTOL
    assert rel_err(right_state.ssm_state, alone_state.ssm_state) < RTOL
    # the conv window ends with the padding (zeros), the SSM state is untouched by it
    assert right_state.conv_state[..., -1].abs().max() == 0


def test_prefill_then_decode_equals_full_forward():
    _, ours = make_pair(seed=11)
    x = torch.randn(2, 23, 32)
    full = ours(x)
    state = ours.empty_state(2)
    with torch.no_grad():
        steps = [ours(x[:, :9], state=state)]  # prefill crossing a chunk boundary
        steps.append(ours(x[:, 9:14], state=state))  # a second (chunked) prefill continues it
        steps += [ours(x[:, t : t + 1], state=state) for t in range(14, 23)]
    assert rel_err(torch.cat(steps, 1), full) < RTOL
    _, final = ssd.ssd_chunk_scan(*_scan_inputs(ours, x), ours.chunk_size, ours.D)
    assert rel_err(state.ssm_state, final) < RTOL


def _scan_inputs(mixer: Mamba2Mixer, x: torch.Tensor):
    """The scan's inputs for x, rebuilt from the mixer's pieces (for checking the final state)."""
    with torch.no_grad():
        _, xBC, dt = mixer.in_proj(x).split(
            [mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], -1
        )
        conv = ssd.causal_conv1d_silu(xBC, mixer.conv1d.weight[:, 0], mixer.conv1d.bias)
        xs, B, C = mixer._split_xbc(conv)
        return xs, mixer._discretize(dt, None), -torch.exp(mixer.A_log), B, C


def test_decode_is_constant_time_state():
    _, ours = make_pair(seed=13)
    state = ours.empty_state(2)
    assert isinstance(state, MambaState)
    assert state.conv_state.shape == (2, ours.conv_dim, 4)
    assert state.ssm_state.shape == (2, 4, 8, 8) and state.ssm_state.dtype == torch.float32
    conv_ptr, ssm_ptr = state.conv_state.data_ptr(), state.ssm_state.data_ptr()
    with torch.no_grad():
        ours(torch.randn(2, 10, 32), state=state)
        for _ in range(5):
            ours(torch.randn(2, 1, 32), state=state)
    # updated in place, fixed size: the cost of a step does not depend on the history
    assert state.conv_state.data_ptr() == conv_ptr and state.ssm_state.data_ptr() == ssm_ptr
    assert state.ssm_state.abs().sum() > 0


def test_bfloat16_close_to_float32():
    _, ours = make_pair(seed=15)
    x = torch.randn(2, 20, 32)
    ref = ours(x)
    out = ours.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 3e-2


def test_init_weights_follows_transformers_scheme():
    cfg = make_config(mamba_num_heads=16, n_groups=4, num_hidden_layers=4)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg, layer_idx=0)
    assert torch.allclose(mixer.A_log, torch.log(torch.arange(1, 17, dtype=torch.float32)))
    assert torch.all(mixer.D == 1) and torch.all(mixer.norm.weight == 1)
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= cfg.time_step_min * 0.999 and dt.max() <= cfg.time_step_max * 1.001
    assert torch.all(mixer.conv1d.bias == 0)
    assert abs(mixer.in_proj.weight.std().item() - cfg.initializer_range) < 0.2 * 0.02
    bound = 1 / math.sqrt(mixer.intermediate_size) / math.sqrt(cfg.num_hidden_layers)
    assert mixer.out_proj.weight.abs().max() <= bound


def test_meta_device_construction():
    with torch.device("meta"):
        mixer = Mamba2Mixer(make_config(), layer_idx=0)
    assert mixer.A_log.is_meta and mixer.in_proj.weight.is_meta


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    _, ours = make_pair()
    x = torch.randn(2, 6, 32)
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours(x, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="seq_idx must be"):
        ours(x, seq_idx=torch.zeros(1, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="cannot be combined"):
        ours(x, seq_idx=torch.zeros(2, 6, dtype=torch.int32), state=ours.empty_state(2))
    with pytest.raises(ValueError, match="scan_impl='cuda'"):
        Mamba2Mixer(make_config(), 0, scan_impl="cuda")
    with pytest.raises(ValueError, match="mamba_hidden_act='gelu'"):
        Mamba2Mixer(make_config(mamba_hidden_act="gelu"), 0)
    with pytest.raises(ValueError, match="divisible by n_groups=3"):
        Mamba2Mixer(make_config(n_groups=3), 0)


@pytest.mark.skipif(HAVE_MAMBA_SSM, reason="mamba-ssm is installed")
def test_kernel_path_requested_without_mamba_ssm_names_the_extra():
    cfg = make_config()
    mixer = Mamba2Mixer(cfg, 0, scan_impl="mamba_ssm")
    with pytest.raises(ImportError, match="'mamba' extra"):
        mixer(torch.randn(1, 4, 32))


# --------------------------------------------------------------------------- GPU kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAVE_MAMBA_SSM, reason="needs mamba-ssm and causal-conv1d (mamba extra)")
def test_kernel_path_matches_torch_path():
    cfg = make_config(
        hidden_size=64, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, chunk_size=16
    )
    torch.manual_seed(0)
    kern = Mamba2Mixer(cfg, 0, scan_impl="mamba_ssm").cuda()
    randomize(kern)
    torch_path = Mamba2Mixer(cfg, 0, scan_impl="torch").cuda()
    torch_path.load_state_dict(kern.state_dict())
    x = torch.randn(2, 45, 64, device="cuda")
    grad_out = torch.randn_like(x)
    seq_idx = torch.tensor([[0] * 20 + [1] * 25] * 2, dtype=torch.int32, device="cuda")
    for kwargs in ({}, {"seq_idx": seq_idx}):
        out_k, dx_k, g_k = forward_backward(kern, x, grad_out, **kwargs)
        out_t, dx_t, g_t = forward_backward(torch_path, x, grad_out, **kwargs)
        assert rel_err(out_k, out_t) < 1e-3 and rel_err(dx_k, dx_t) < 1e-3
        for name in g_t:
            assert rel_err(g_k[name], g_t[name]) < 1e-3, name
    states = [m.empty_state(2) for m in (kern, torch_path)]
    with torch.no_grad():
        for m, st in zip((kern, torch_path), states, strict=True):
            m(x[:, :30], state=st)
        steps = [m(x[:, 30:31], state=st) for m, st in zip((kern, torch_path), states, strict=True)]
    assert rel_err(steps[0], steps[1]) < 1e-3
    assert rel_err(states[0].ssm_state, states[1].ssm_state) < 1e-3
