"""Multi-token prediction (MTP) heads for Nemotron-H.

transformers' NemotronH has no MTP forward (it drops `mtp.*` checkpoint keys
on load), so the math is defined here, DeepSeek-V3 style, with the
parameter layout of the released checkpoints (`mtp.layers.{i}.*`):

- The heads predict further ahead than the main head: depth d (0-based)
  predicts, at position t, the token at t + d + 2.
- Each depth is a short stack of Nemotron blocks whose types come from
  `config.mtp_layers_block_type` (e.g. attention then MoE). Sub-layer i of
  depth d is `mtp.layers.{d * len(pattern) + i}`; with
  `mtp_use_repeated_layer=True` one stack (`mtp.layers.0..len-1`) is shared
  by every depth.
- The first sub-layer of a depth fuses its inputs:
  `eh_proj(cat[enorm(e_d), hnorm(h_{d-1})])`, where `e_d` is the embedding
  of the input tokens shifted left by d + 1 and `h_{-1}` is the main
  decoder's output after its final norm (as in Megatron-Core's MTP, which
  the released heads were trained with). The last sub-layer ends with
  `final_layernorm`; its output is `h_d`.
- Logits of depth d are the shared `lm_head(h_d)`. The MTP loss is
  `mtp_loss_scaling_factor * mean_d CE(logits_d, labels shifted by d + 2)`,
  added to the main loss; each CE is a mean over the depth's valid positions.

Packed (THD) and padded batches: every MTP block gets the main decoder's
`BlockInputs` (attention mask / THD boundaries, token mask, `seq_idx`), so no
attention or Mamba state crosses a sequence boundary. A shift by k is valid at
t only if t and t + k are real tokens of the same sequence (`shift_valid`);
elsewhere `e_d` is the embedding of token id 0 and the target ignored, exactly as
past the end of an unpacked row. So a packed row gives each sequence the hidden states and token
losses it gets alone. Boundaries carried only inside a 4D attention mask are
not seen by the shift; pass `cu_seqlens` / `seq_idx` / a 2D mask for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from am_dtype.backend import BackendConfig, initialize_linear_module
from am_dtype.backend import initialize_rms_norm_module as _rms_norm
from am_dtype.dtypes import config_dtype
from am_models_nemotron.layers import BlockInputs, NemotronBlock, resolve_block_types
from am_utils.loss import IGNORE_INDEX


@dataclass
class MTPConfig:
    """Number of MTP depths, their block pattern, weight sharing and loss scale."""

    num_layers: int = 0
    block_types: tuple[str, ...] = ("attention", "moe")
    use_repeated_layer: bool = False
    loss_scaling_factor: float = 0.1

    def __post_init__(self) -> None:
        if self.num_layers < 0:
            raise ValueError(f"num_nextn_predict_layers={self.num_layers} must be >= 0")
        if self.num_layers and not self.block_types:
            raise ValueError("MTP needs at least one block type in mtp_layers_block_type")

    @property
    def enabled(self) -> bool:
        return self.num_layers > 0

    @property
    def num_stacks(self) -> int:
        """Distinct sub-layer stacks held in parameters (1 when shared across depths)."""
        return 1 if self.use_repeated_layer else self.num_layers

    @classmethod
    def from_hf(
        cls,
        config: Any,
        num_layers: int | None = None,
        use_repeated_layer: bool = False,
        loss_scaling_factor: float = 0.1,
    ) -> MTPConfig:
        """Read `num_nextn_predict_layers` and `mtp_layers_block_type` off an HF config."""
        if num_layers is None:
            num_layers = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
        types = resolve_block_types(config, "mtp_layers_block_type") if num_layers else []
        return cls(num_layers, tuple(types), use_repeated_layer, loss_scaling_factor)


class NemotronMTPSublayer(NemotronBlock):
    """A Nemotron block plus the depth-entry fusion and/or depth-exit final norm."""

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        block_type: str,
        backend: BackendConfig,
        moe_config: Any,
        has_fusion: bool,
        has_final_norm: bool,
    ):
        super().__init__(config, layer_idx, block_type, backend, moe_config)
        hidden, eps, dtype = config.hidden_size, config.layer_norm_epsilon, config_dtype(config)
        if has_fusion:
            self.enorm = _rms_norm(backend.rms_norm, hidden, eps=eps, dtype=dtype)
            self.hnorm = _rms_norm(backend.rms_norm, hidden, eps=eps, dtype=dtype)
            self.eh_proj = initialize_linear_module(
                backend.linear,
                2 * hidden,
                hidden,
                bias=False,
                dtype=dtype,
                cpu_gemm=backend.cpu_gemm,
            )
        if has_final_norm:
            self.final_layernorm = _rms_norm(backend.rms_norm, hidden, eps=eps, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        inputs: BlockInputs | None = None,
        embed_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if hasattr(self, "eh_proj"):
            if embed_input is None:
                raise ValueError("the first MTP sub-layer of a depth needs embed_input")
            x = self.eh_proj(torch.cat([self.enorm(embed_input), self.hnorm(x)], dim=-1))
        x = super().forward(x, inputs)
        if hasattr(self, "final_layernorm"):
            x = self.final_layernorm(x)
        return x


class NemotronMTP(nn.Module):
    """All MTP depths; `forward` returns the per-depth hidden states h_d."""

    def __init__(self, config: Any, mtp_config: MTPConfig, backend: BackendConfig, moe_config):
        super().__init__()
        self.mtp_config = mtp_config
        n = len(mtp_config.block_types)
        base = len(resolve_block_types(config))
        self.layers = nn.ModuleDict()
        for stack in range(mtp_config.num_stacks):
            for i, block_type in enumerate(mtp_config.block_types):
                idx = stack * n + i
                self.layers[str(idx)] = NemotronMTPSublayer(
                    config,
                    base + idx,
                    block_type,
                    backend,
                    moe_config,
                    has_fusion=i == 0,
                    has_final_norm=i == n - 1,
                )

    def depth_layers(self, depth: int) -> list[nn.Module]:
        """Sub-layers that run at `depth` (the shared stack when layers repeat)."""
        n = len(self.mtp_config.block_types)
        stack = 0 if self.mtp_config.use_repeated_layer else depth
        return [self.layers[str(stack * n + i)] for i in range(n)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        embed_inputs: tuple[torch.Tensor, ...],
        inputs: BlockInputs | None = None,
    ) -> list[torch.Tensor]:
        """h_d for every depth, shaped like `hidden_states` ([B, S, H] or squeezed THD [T, H]).

        `inputs` must be the BlockInputs the main decoder ran with (mask / THD boundaries,
        token mask, seq_idx), so packed and padded batches keep their boundaries here too;
        None means plain causal rows.
        """
        if len(embed_inputs) != self.mtp_config.num_layers:
            raise ValueError(
                f"MTP got {len(embed_inputs)} embedding inputs; expected "
                f"num_nextn_predict_layers={self.mtp_config.num_layers}"
            )
        squeezed = hidden_states.dim() == 2
        h = hidden_states.unsqueeze(0) if squeezed else hidden_states
        per_depth = []
        for depth, embed in enumerate(embed_inputs):
            embed = embed.unsqueeze(0) if embed.dim() == 2 else embed
            for i, layer in enumerate(self.depth_layers(depth)):
                h = layer(h, inputs, embed_input=embed if i == 0 else None)
            per_depth.append(h.squeeze(0) if squeezed else h)
        return per_depth


def roll_tokens_left(input_ids: torch.Tensor, shift: int, fill: int = 0) -> torch.Tensor:
    """`input_ids` shifted left by `shift` along the sequence, the tail filled with `fill`."""
    out = torch.full_like(input_ids, fill)
    if shift < input_ids.shape[-1]:
        out[..., : input_ids.shape[-1] - shift] = input_ids[..., shift:]
    return out


def shift_valid(
    shape: torch.Size | tuple[int, int],
    shift: int,
    seq_idx: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """[B, S] bool: True where t + shift is in the row and t, t + shift are one sequence's tokens.

    `seq_idx` [B or 1, S] marks packed sequences (equal values = same sequence), `token_mask`
    [B, S] real tokens (False = padding); without either only the last `shift` are False.
    """
    B, S = shape
    valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    n = S - shift
    if n <= 0:
        return valid
    valid[:, :n] = True
    if seq_idx is not None:
        valid[:, :n] &= seq_idx[:, shift:] == seq_idx[:, :n]
    if token_mask is not None:
        valid[:, :n] &= token_mask[:, shift:] & token_mask[:, :n]
    return valid


def _packing(inputs: BlockInputs | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if inputs is None:
        return None, None
    return inputs.seq_idx, inputs.token_mask


def mtp_embed_inputs(
    embed_tokens: nn.Module,
    input_ids: torch.Tensor,
    num_layers: int,
    inputs: BlockInputs | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-depth embeddings of the tokens shifted left by d + 1 (d = 0..num_layers - 1), with
    token id 0 where the shift is not valid: the vacated tail of each row, as in the reference,
    and likewise where it would reach the next packed sequence or padding (`shift_valid`),
    so a packed sequence gets exactly the embeddings it gets alone.

    `inputs` are the main decoder's BlockInputs (their `seq_idx` / `token_mask`); a [T]
    (squeezed THD) `input_ids` gives [T, H] embeddings.
    """
    squeezed = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if squeezed else input_ids
    seq_idx, token_mask = _packing(inputs)
    out = []
    for depth in range(num_layers):
        valid = shift_valid(ids.shape, depth + 1, seq_idx, token_mask, ids.device)
        shifted = roll_tokens_left(ids, depth + 1).masked_fill(~valid, 0)
        emb = embed_tokens(shifted)
        out.append(emb.squeeze(0) if squeezed else emb)
    return tuple(out)


def mtp_loss(
    per_depth_h: list[torch.Tensor],
    labels: torch.Tensor,
    lm_head: nn.Module,
    scaling_factor: float,
    inputs: BlockInputs | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`scaling_factor * mean over depths of CE(lm_head(h_d), labels shifted left by d + 2)`.

    Each depth's CE is the mean over positions whose target is valid (`shift_valid` with the
    main decoder's `inputs`) and not -100: a target in another packed sequence, in padding
    or past the end never counts. A depth without any valid target gives NaN, as
    `F.cross_entropy` does. With `num_items_in_batch` (transformers' Trainer, gradient
    accumulation) each depth's CE is instead its sum over valid targets divided by it, the
    normalization of the main loss, so microbatch losses add up to a window's mean.
    """
    rows = labels.unsqueeze(0) if labels.dim() == 1 else labels  # [T] labels of a THD batch
    seq_idx, token_mask = _packing(inputs)
    losses = []
    for depth, h in enumerate(per_depth_h):
        target = roll_tokens_left(rows, depth + 2, fill=IGNORE_INDEX)
        valid = shift_valid(rows.shape, depth + 2, seq_idx, token_mask, rows.device)
        target = target.masked_fill(~valid, IGNORE_INDEX)
        logits = lm_head(h).float()
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="mean" if num_items_in_batch is None else "sum",
        )
        losses.append(ce if num_items_in_batch is None else ce / num_items_in_batch)
    return scaling_factor * torch.stack(losses).mean()
