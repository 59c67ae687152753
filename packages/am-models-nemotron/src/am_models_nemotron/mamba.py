"""Nemotron-H's Mamba2 mixer, with a pure-PyTorch path (CPU default) and mamba-ssm kernels.

Choices:
- Parameter names and shapes are exactly those of transformers'
  `NemotronHMamba2Mixer` (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj),
  so checkpoints map 1:1.
- in_proj gives [z | xBC | dt]; xBC goes through a causal depthwise conv + SiLU,
  then the selective scan with dt = clamp(softplus(dt + dt_bias), min=time_step_min)
  (clamped in decode steps too, so decoding equals the full forward; transformers
  clamps only its chunked path); the output is normalized as
  weight * rmsnorm_per_group(y * silu(z)) (n_groups groups) and projected back by
  out_proj. The torch path computes conv, scan and norm in float32 whatever the
  parameter dtype.
- Padding (`attention_mask` 0) is removed from the recurrence: the padded
  positions' conv inputs and dt are zeroed (dt = 0 means no decay and no input),
  and their scan outputs are zero, so they change neither other positions nor the
  state.
- Packed rows (`seq_idx`) reset conv and SSM state at every sequence boundary.
- `MambaState` carries decoding state; a forward given one reads it as the
  state before its first token and writes the state after its last token in
  place. A one-token forward with a state is an O(1) recurrent step.
- The mamba-ssm / causal-conv1d kernels are used for CUDA inputs when both
  packages are installed (the `mamba` extra); `scan_impl` forces a path.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from am_dtype.backend import BackendConfig, initialize_linear_module
from am_dtype.dtypes import config_dtype, resolve_dtype
from am_models_nemotron import ssd


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


HAVE_MAMBA_SSM = _has("mamba_ssm") and _has("causal_conv1d")
SCAN_IMPLS = ("auto", "torch", "mamba_ssm")


@dataclass
class MambaState:
    """Recurrent state of one Mamba2 layer, updated in place by `Mamba2Mixer.forward`.

    conv_state: [B, conv_dim, d_conv] the last d_conv conv inputs (x|B|C channels,
        before the conv), oldest first, newest at index -1; zeros before any token.
    ssm_state: [B, n_heads, head_dim, d_state] the SSM state after the last token.
    """

    conv_state: Tensor
    ssm_state: Tensor


class GatedRMSNorm(nn.Module):
    """weight * rmsnorm(y * silu(gate)) over groups of `group_size` channels, in fp32."""

    def __init__(self, hidden_size: int, group_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: Tensor, gate: Tensor) -> Tensor:
        return ssd.gated_rms_norm(y, gate, self.weight, self.group_size, self.eps)


def _num_layers(config: Any) -> int:
    """Decoder depth: `num_hidden_layers` when the config has it (transformers derives it from
    the block list), else the length of the block list of a plain config object."""
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        from am_models_nemotron.layers import resolve_block_types

        n = len(resolve_block_types(config))
    return n


class Mamba2Mixer(nn.Module):
    """Mamba2 (SSD) token mixer of Nemotron-H, numerically equal to transformers' torch path."""

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        backend: BackendConfig | None = None,
        scan_impl: str = "auto",
    ):
        super().__init__()
        if config.mamba_hidden_act != "silu":
            raise ValueError(
                f"mamba_hidden_act={config.mamba_hidden_act!r} is not supported; accepted: ['silu']"
            )
        if scan_impl not in SCAN_IMPLS:
            raise ValueError(f"scan_impl={scan_impl!r} is not supported; accepted: {SCAN_IMPLS}")
        self.config = config
        self.layer_idx = layer_idx
        self.scan_impl = scan_impl
        self.hidden_size = config.hidden_size
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.ssm_state_size = config.ssm_state_size
        self.n_groups = config.n_groups
        self.conv_kernel_size = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.time_step_min = config.time_step_min
        self.intermediate_size = self.num_heads * self.head_dim
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self._check_shapes()

        backend = backend or BackendConfig()
        dtype = config_dtype(config)
        proj_size = self.intermediate_size + self.conv_dim + self.num_heads
        self.in_proj = initialize_linear_module(
            backend.linear,
            self.hidden_size,
            proj_size,
            bias=config.use_bias,
            dtype=dtype,
            cpu_gemm=backend.cpu_gemm,
        )
        # nn.Conv1d only for the checkpoint layout ([conv_dim, 1, K]); its forward is never used.
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=self.conv_kernel_size,
            groups=self.conv_dim,
            padding=self.conv_kernel_size - 1,
            bias=config.use_conv_bias,
            dtype=dtype,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads, dtype=dtype))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads, dtype=dtype))
        self.D = nn.Parameter(torch.ones(self.num_heads, dtype=dtype))
        self.norm = GatedRMSNorm(
            self.intermediate_size,
            self.intermediate_size // self.n_groups,
            config.layer_norm_epsilon,
            dtype,
        )
        self.out_proj = initialize_linear_module(
            backend.linear,
            self.intermediate_size,
            self.hidden_size,
            bias=config.use_bias,
            dtype=dtype,
            cpu_gemm=backend.cpu_gemm,
        )
        if self.A_log.device.type != "meta":
            self.init_weights()

    def _check_shapes(self) -> None:
        if self.num_heads % self.n_groups:
            raise ValueError(
                f"mamba_num_heads={self.num_heads} must be divisible by n_groups={self.n_groups}"
            )
        if self.chunk_size <= 0 or self.conv_kernel_size < 1:
            raise ValueError(
                f"chunk_size={self.chunk_size} and conv_kernel={self.conv_kernel_size} must be >= 1"
            )

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(
        self, buffer_device: torch.device | None = None, init_std: float | None = None
    ) -> None:
        """Initialize like transformers' `NemotronHPreTrainedModel._init_weights`.

        The components' init API: `buffer_device` is accepted for it (the mixer has no
        buffers); `init_std` defaults to `config.initializer_range`.

        in_proj / conv1d weights ~ N(0, initializer_range), biases 0; A_log = log(1..H);
        D = 1; dt_bias = softplus^-1(dt) with dt log-uniform in [time_step_min,
        time_step_max] (floored at time_step_floor); norm weight 1; out_proj
        kaiming-uniform / sqrt(num_hidden_layers) when rescale_prenorm_residual, else
        N(0, std). Random draws are made in fp32 and then cast to the parameter dtype.
        """
        cfg = self.config
        std = init_std if init_std is not None else cfg.initializer_range
        for module in (self.in_proj, self.conv1d, self.out_proj):
            module.weight.copy_(torch.randn(module.weight.shape, device=module.weight.device) * std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        heads = torch.arange(1, self.num_heads + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(heads))
        self.D.fill_(1.0)
        lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
        dt = torch.exp(torch.rand(self.num_heads, device=self.dt_bias.device) * (hi - lo) + lo)
        dt = dt.clamp(min=cfg.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.norm.weight.fill_(1.0)
        if getattr(cfg, "rescale_prenorm_residual", True):
            w = torch.empty(self.out_proj.weight.shape, device=self.out_proj.weight.device)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            self.out_proj.weight.copy_(w / math.sqrt(_num_layers(cfg)))

    def reset_parameters(self) -> None:
        """`nn.Module` convention: `init_weights()` with the config's defaults."""
        self.init_weights()

    def empty_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MambaState:
        """Zero decoding state. conv_state in `dtype` (default: the parameters' dtype);
        ssm_state in config.mamba_ssm_cache_dtype (default float32)."""
        device = device if device is not None else self.A_log.device
        conv_dtype = dtype or self.in_proj.weight.dtype
        ssm_dtype = resolve_dtype(getattr(self.config, "mamba_ssm_cache_dtype", None)) or (
            torch.float32
        )
        return MambaState(
            conv_state=torch.zeros(
                batch_size, self.conv_dim, self.conv_kernel_size, device=device, dtype=conv_dtype
            ),
            ssm_state=torch.zeros(
                batch_size,
                self.num_heads,
                self.head_dim,
                self.ssm_state_size,
                device=device,
                dtype=ssm_dtype,
            ),
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: Tensor,
        *,
        attention_mask: Tensor | None = None,
        seq_idx: Tensor | None = None,
        state: MambaState | None = None,
    ) -> Tensor:
        """Mix tokens of hidden_states [B, S, hidden] -> [B, S, hidden].

        attention_mask: [B, S] (1 keep, 0 pad; a longer mask contributes its last S columns).
        seq_idx: [B, S] int sequence index of packed sequences, non-decreasing per row.
        state: decoding state read before the first token and overwritten after the last;
            with S == 1 this is one O(1) recurrent step.
        """
        Bt, S, _ = hidden_states.shape
        mask = self._padding_mask(attention_mask, Bt, S, hidden_states)
        if seq_idx is not None:
            self._check_seq_idx(seq_idx, Bt, S, state)
        ops = self._ops(hidden_states)
        zxbcdt = self.in_proj(hidden_states)
        gate, xBC, dt = zxbcdt.split([self.intermediate_size, self.conv_dim, self.num_heads], -1)
        if mask is not None:
            xBC = xBC * mask[..., None]
        dt = self._discretize(dt, mask)
        A = -torch.exp(self.A_log.float())
        if Bt * S == 0:
            y = self._empty_scan(xBC, dt, A)
        elif state is not None and S == 1:
            y = self._step(ops, xBC[:, 0], dt[:, 0], A, state)[:, None]
        else:
            y = self._scan(ops, xBC, dt, A, seq_idx, state)
        if mask is not None:
            y = y * mask[..., None]
        out = self.norm(y, gate)
        return self.out_proj(out.to(hidden_states.dtype))

    def _ops(self, x: Tensor) -> type:
        impl = self.scan_impl
        if impl == "auto":
            impl = "mamba_ssm" if HAVE_MAMBA_SSM and x.is_cuda else "torch"
        return _SCAN_OPS[impl]

    def _padding_mask(self, mask: Tensor | None, Bt: int, S: int, x: Tensor) -> Tensor | None:
        if mask is None:
            return None
        if mask.dim() != 2 or mask.shape[0] != Bt or mask.shape[1] < S:
            raise ValueError(
                f"attention_mask must be [batch, seq] = [{Bt}, >={S}] with 1 = keep, 0 = pad; "
                f"got shape {tuple(mask.shape)}"
            )
        return mask[:, -S:].to(x.dtype)

    @staticmethod
    def _check_seq_idx(seq_idx: Tensor, Bt: int, S: int, state: MambaState | None) -> None:
        if tuple(seq_idx.shape) != (Bt, S):
            raise ValueError(f"seq_idx must be [{Bt}, {S}]; got shape {tuple(seq_idx.shape)}")
        if state is not None:
            raise ValueError("seq_idx (packed sequences) cannot be combined with a decoding state")

    def _discretize(self, dt: Tensor, mask: Tensor | None) -> Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(min=self.time_step_min)
        return dt if mask is None else dt * mask[..., None]

    def _split_xbc(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gn = self.n_groups * self.ssm_state_size
        x, B, C = xBC.split([self.intermediate_size, gn, gn], dim=-1)
        lead = xBC.shape[:-1]
        return (
            x.unflatten(-1, (self.num_heads, self.head_dim)),
            B.reshape(*lead, self.n_groups, self.ssm_state_size),
            C.reshape(*lead, self.n_groups, self.ssm_state_size),
        )

    def _scan(self, ops, xBC, dt, A, seq_idx, state: MambaState | None) -> Tensor:
        K = self.conv_kernel_size
        weight = self.conv1d.weight[:, 0]
        if state is not None:
            prefix = state.conv_state[:, :, 1:].transpose(1, 2).to(xBC.dtype)
            full = torch.cat([prefix, xBC], dim=1)
            state.conv_state.copy_(full[:, -K:].transpose(1, 2))
            conv = ops.conv(full, weight, self.conv1d.bias, None)[:, K - 1 :]
        else:
            conv = ops.conv(xBC, weight, self.conv1d.bias, seq_idx)
        x, B, C = self._split_xbc(conv)
        initial = None if state is None else state.ssm_state
        y, final = ops.scan(x, dt, A, B, C, self.chunk_size, self.D, initial, seq_idx)
        if state is not None:
            state.ssm_state.copy_(final.detach())
        return y.flatten(-2)

    def _empty_scan(self, xBC: Tensor, dt: Tensor, A: Tensor) -> Tensor:
        """The scan of zero tokens: an empty [Bt, S, H * P] that still depends on every parameter.

        An expert-parallel rank with an empty batch must run forward and backward with its
        peers (the MoE all-to-alls, FSDP's gradient reduce-scatter), and its parameters must
        get gradients (zeros) exactly as on ranks with tokens; the scan kernels themselves do
        not accept zero-length inputs.
        """
        conv = xBC * self.conv1d.weight[:, 0].sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        x, B, C = self._split_xbc(conv)
        mix = (dt * A)[..., None] * (B.sum((-2, -1)) + C.sum((-2, -1)))[..., None, None]
        return (x * self.D[:, None] + mix).flatten(-2)

    def _step(self, ops, xBC: Tensor, dt: Tensor, A: Tensor, state: MambaState) -> Tensor:
        conv = ops.conv_step(xBC, state.conv_state, self.conv1d.weight[:, 0], self.conv1d.bias)
        x, B, C = self._split_xbc(conv)
        return ops.step(state.ssm_state, x, dt, A, B, C, self.D).flatten(-2)


# The SSD result does not depend on the chunk length (up to rounding), only its cost does:
# per token the in-chunk term grows with the chunk, the chunk recurrence shrinks with it.
# The pure-PyTorch scan is fastest with 64-position chunks at the shapes bench/nemotron.py
# measures (1 thread, fwd+bwd: 115 ms at 64 vs 140 ms at 128 and 193 ms at 256 for 16 heads
# x 64, state 128, 1024 tokens), so it never runs longer chunks than that; the mamba-ssm
# kernels use config.chunk_size as given.
TORCH_SCAN_CHUNK = 64


class _TorchOps:
    """Pure-PyTorch path (ssd.py): runs anywhere, differentiable through autograd."""

    conv = staticmethod(ssd.causal_conv1d_silu)

    @staticmethod
    def scan(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx):
        chunk = min(chunk_size, TORCH_SCAN_CHUNK)
        return ssd.ssd_chunk_scan(x, dt, A, B, C, chunk, D, initial_state, seq_idx)

    conv_step = staticmethod(ssd.conv_step)
    step = staticmethod(ssd.ssd_step)


class _MambaSSMOps:
    """mamba-ssm / causal-conv1d CUDA kernels, imported on first use (the `mamba` extra)."""

    @staticmethod
    def _require() -> None:
        if not HAVE_MAMBA_SSM:
            raise ImportError(
                "scan_impl='mamba_ssm' needs the mamba-ssm and causal-conv1d packages; install the "
                "'mamba' extra of am-models-nemotron or use scan_impl='torch'"
            )

    @staticmethod
    def conv(x, weight, bias, seq_idx):
        _MambaSSMOps._require()
        from causal_conv1d import causal_conv1d_fn

        # Channel-last memory ([B, S, C] viewed as [B, C, S]) is what seq_idx support requires.
        x_cl = x.contiguous().transpose(1, 2)
        idx = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        out = causal_conv1d_fn(x_cl, weight, bias, seq_idx=idx, activation="silu")
        return out.transpose(1, 2)

    @staticmethod
    def scan(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx):
        _MambaSSMOps._require()
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        idx = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        init = None if initial_state is None else initial_state.float()
        y, final = mamba_chunk_scan_combined(
            x.contiguous(),
            dt.contiguous(),
            A,
            B.contiguous(),
            C.contiguous(),
            chunk_size,
            D=D.float(),
            initial_states=init,
            seq_idx=idx,
            return_final_states=True,
        )
        return y.float(), final

    @staticmethod
    def conv_step(x, conv_state, weight, bias):
        _MambaSSMOps._require()
        from causal_conv1d import causal_conv1d_update

        return causal_conv1d_update(x, conv_state, weight, bias, activation="silu")

    @staticmethod
    def step(state, x, dt, A, B, C, D):
        _MambaSSMOps._require()
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        H, P, N = state.shape[1:]
        return selective_state_update(
            state,
            x,
            dt[..., None].expand(-1, H, P),
            A[:, None, None].expand(H, P, N),
            B,
            C,
            D=D[:, None].expand(H, P),
        ).float()


_SCAN_OPS: dict[str, type] = {"torch": _TorchOps, "mamba_ssm": _MambaSSMOps}
