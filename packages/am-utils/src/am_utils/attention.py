"""The attention kernel table every model uses, with Transformer Engine's THD ("varlen") glue.

A model projects q/k/v itself and hands them, [B, H, S, Dh] with grouped-query keys
[B, Hkv, K, Dh], to an `AttentionKernel` built from `BackendConfig.attn` (and
`compile_attn`). The kernels take the same arguments:

- "sdpa", "eager", "flex" run on CPU and read a dense mask: None (plain causal, the
  queries being the last Q of the K key positions) or [B or 1, 1, Q, K], bool (True = may
  attend) or additive float (0 = attend, a large negative value = blocked), as built by
  `am_utils.masks`. "sdpa" recognises a packed-documents mask (causal within contiguous
  documents, nothing across them) and on CPU runs one causal SDPA call per document: the same
  softmax over the same keys, without the [Q, K] scores between documents;
- "te" (Transformer Engine's DotProductAttention; CUDA and the `te` extra) reads sequence
  boundaries instead: `VarlenSeqs` for packed / padded batches (`build_varlen_seqs`),
  None for plain causal.

`sliding_window=W` restricts query i to keys j with i - W < j <= i (positions counted in the
key sequence); every kernel applies it, also on top of an explicit mask. `scale` is the
softmax scale (head_dim**-0.5 by default; Gemma-style pre-normed queries pass 1.0).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from am_dtype import backend as _backend
from am_utils.masks import causal_mask, to_bool_mask
from am_utils.validation import check_cu_seqlens

__all__ = [
    "ATTENTION_KERNELS",
    "AttentionKernel",
    "VarlenSeqs",
    "build_te_attention",
    "build_varlen_seqs",
    "is_block_mask",
]

logger = logging.getLogger(__name__)


@dataclass
class VarlenSeqs:
    """A packed or padded batch as Transformer Engine's THD ("varlen") attention takes it.

    The queries [B, Q] and keys [B, K] of one attention call are flattened row-major;
    `q_index` / `kv_index` pick, in order, the tokens that take part (None: all of them,
    as in a packed [1, T] batch without padding). The picked tokens are laid out as
    [T, heads, head_dim], sequence i holding rows cu_seqlens[i]:cu_seqlens[i + 1] and
    attending causally only within itself. Built once per forward by the model
    (`build_varlen_seqs`) and shared by every attention layer.

    cu_seqlens_q / cu_seqlens_kv: [N + 1] int32 cumulative sequence lengths.
    max_seqlen_q / max_seqlen_kv: the longest sequence (Python ints, no device sync later).
    attn_mask_type: "padding_causal" (queries and keys are the same tokens) or
        "padding_causal_bottom_right" (decoding a padded batch with a cache: each
        sequence's queries are its last keys).
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_kv: torch.Tensor
    max_seqlen_q: int
    max_seqlen_kv: int
    q_index: torch.Tensor | None = None
    kv_index: torch.Tensor | None = None
    attn_mask_type: str = "padding_causal"


# --------------------------------------------------------------------------- the kernels
# kernel(q, k, v, *, mask, scale, dropout_p, sliding_window, varlen, te_module) -> [B, H, Q, Dh]


def _windowed(mask: torch.Tensor | None, q_len: int, k_len: int, window: int | None, device):
    """`mask` with the sliding window applied (None stays None when there is no window)."""
    if window is None:
        return mask
    inside = causal_mask(q_len, k_len, sliding_window=window, device=device)
    if mask is None:
        return inside
    if mask.dtype == torch.bool:
        return mask & inside
    return mask.masked_fill(~inside, torch.finfo(mask.dtype).min)


# At most this many segments per call are run one by one (a Python loop of SDPA calls);
# beyond it the dense masked call is taken.
_MAX_SEGMENTS = 1024
_segments_cache: tuple = (None, -1, None)  # (weakref to the mask, its _version, segments)


def _causal_segments(mask: torch.Tensor, q_len: int, k_len: int) -> list[list[int]] | None:
    """Per mask row, the boundaries [0, s1, ..., S] of contiguous segments when the bool mask
    [B or 1, 1, S, S] is exactly causal within each segment and blocked across them (packed
    documents, `build_attention_mask(seq_idx=...)` without padding); otherwise None.

    The check is exact (the mask is rebuilt from the segments and compared), so any other
    pattern keeps the dense call. The result is cached for the last mask seen (a model
    shares one mask across its attention layers)."""
    global _segments_cache
    if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or q_len != k_len
            or q_len < 2 or tuple(mask.shape[-2:]) != (q_len, k_len)):  # fmt: skip
        return None
    ref, version, segments = _segments_cache
    if ref is not None and ref() is mask and version == mask._version:
        return segments
    allowed = mask[:, 0]
    first = allowed.to(torch.uint8).argmax(-1)  # [b, S]: the first key each query sees
    pos = torch.arange(q_len, device=mask.device)
    is_start = first == pos
    rebuilt = (pos >= first[:, :, None]) & (pos <= pos[:, None])
    segments = None
    # a row's queries share their segment's start: each `first` is the previous one or itself
    runs = (first[:, 1:] == first[:, :-1]) | is_start[:, 1:]
    if bool(is_start[:, 0].all() & runs.all()) and torch.equal(rebuilt, allowed):
        starts = is_start.nonzero().tolist()
        if len(starts) <= _MAX_SEGMENTS:
            segments = [[] for _ in range(allowed.shape[0])]
            for row, start in starts:
                segments[row].append(start)
            for bounds in segments:
                bounds.append(q_len)
    _segments_cache = (weakref.ref(mask), mask._version, segments)
    return segments


def _sdpa_segments(q, k, v, segments, scale, dropout_p):
    """SDPA causal within each segment: the work of the documents alone, not of [S, S]."""
    rows = []
    for row, bounds in enumerate(segments):
        b = slice(row, row + 1) if len(segments) > 1 else slice(None)
        parts = [
            F.scaled_dot_product_attention(
                q[b, :, s:e],
                k[b, :, s:e],
                v[b, :, s:e],
                scale=scale,
                is_causal=True,
                enable_gqa=q.shape[1] != k.shape[1],
                dropout_p=dropout_p,
            )  # fmt: skip
            for s, e in zip(bounds, bounds[1:], strict=False)
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def _sdpa(q, k, v, *, mask, scale, dropout_p, sliding_window=None, varlen=None, te_module=None):
    q_len, k_len = q.shape[2], k.shape[2]
    if mask is not None and sliding_window is None and q.device.type == "cpu":
        # A packed-documents mask: SDPA per document, causal (CPU SDPA with a dense mask
        # computes all S*S scores; per document it is the sum of the documents' squares,
        # halved by the causal skip). Same softmax over the same keys. CPU only: reading the
        # segments is a host sync, and on CUDA packed rows take attn="te" (THD boundaries).
        segments = _causal_segments(mask, q_len, k_len)
        if segments is not None:
            return _sdpa_segments(q, k, v, segments, scale, dropout_p)
    mask = _windowed(mask, q_len, k_len, sliding_window, q.device)
    if mask is None and q_len != k_len and q_len != 1:
        mask = causal_mask(q_len, k_len, device=q.device)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and q_len == k_len and q_len > 1,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        dropout_p=dropout_p,
    )


def _eager(q, k, v, *, mask, scale, dropout_p, sliding_window=None, varlen=None, te_module=None):
    q_len, k_len = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = _windowed(mask, q_len, k_len, sliding_window, q.device)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask
    elif mask is not None or q_len > 1:
        allowed = mask if mask is not None else causal_mask(q_len, k_len, device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v)


def is_block_mask(mask: object) -> bool:
    """True for a FlexAttention `BlockMask` (only attn='flex' takes one)."""
    if mask is None or isinstance(mask, torch.Tensor):
        return False
    from torch.nn.attention.flex_attention import BlockMask

    return isinstance(mask, BlockMask)


def _flex_block_mask(block_mask, q, q_len: int, k_len: int, window: int | None):
    """A given BlockMask, checked against q/k and with the layer's sliding window ANDed in."""
    from torch.nn.attention.flex_attention import and_masks, create_block_mask

    b, _, mq, mk = block_mask.shape
    if (mq, mk) != (q_len, k_len) or b not in (1, q.shape[0]):
        raise ValueError(
            f"the BlockMask covers batch {b} x {mq} queries x {mk} keys, but attention has "
            f"batch {q.shape[0]} x {q_len} queries x {k_len} keys"
        )
    if window is None:
        return block_mask
    offset = k_len - q_len  # bottom-right alignment, as causal_mask's window

    def inside(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + offset) & (kv_idx > q_idx + offset - window)

    return create_block_mask(
        and_masks(block_mask.mask_mod, inside),
        b,
        None,
        q_len,
        k_len,
        device=q.device.type,
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
    )


def _flex(q, k, v, *, mask, scale, dropout_p, sliding_window=None, varlen=None, te_module=None):
    from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

    q_len, k_len = q.shape[2], k.shape[2]
    cpu_autograd = q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad
    if is_block_mask(mask):
        block_mask = _flex_block_mask(mask, q, q_len, k_len, sliding_window)
        if cpu_autograd:
            _warn_once("attn='flex' on CPU with autograd runs the equivalent masked SDPA")
            b = block_mask.shape[0]
            dense = create_mask(block_mask.mask_mod, b, 1, q_len, k_len, device=q.device.type)
            return _sdpa(q, k, v, mask=dense, scale=scale, dropout_p=dropout_p)
        return flex_attention(
            q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    mask = _windowed(mask, q_len, k_len, sliding_window, q.device)
    allowed = to_bool_mask(mask) if mask is not None else causal_mask(q_len, k_len, device=q.device)
    allowed = allowed.expand(q.shape[0], 1, q_len, k_len)
    if cpu_autograd:
        # torch's CPU FlexAttention has no backward; the same mask through SDPA is the same math.
        _warn_once("attn='flex' on CPU with autograd runs the equivalent masked SDPA")
        return _sdpa(q, k, v, mask=allowed, scale=scale, dropout_p=dropout_p)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, 0, q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, q.shape[0], None, q_len, k_len, device=q.device.type)
    return flex_attention(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _to_thd(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    # [B, H, S, Dh] -> [B * S, H, Dh] (a view when x came from a projection), then the picked rows.
    t = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])
    return t if index is None else t.index_select(0, index)


def _te(q, k, v, *, mask, scale, dropout_p, sliding_window=None, varlen=None, te_module=None):
    """Transformer Engine DotProductAttention (`te_module`); the layout is chosen per call.

    Without `varlen` (unpadded batches, decode with a cache): "bshd" [B, S, H, Dh] with
    the module's "causal_bottom_right" mask (plain causal when Q == K; decode rows see
    the whole cache). With `varlen` (packed and/or padded batches): "thd" [T, H, Dh]
    with `qkv_format`, `attn_mask_type`, `cu_seqlens_q/kv` and `max_seqlen_q/kv` passed
    to forward, which overrides the construction-time format and mask type; TE never
    attends across a cu_seqlens boundary. Query rows left out by `varlen.q_index`
    (padding) come back as zeros. The scale, dropout and sliding window are the module's
    (`build_te_attention`).
    """
    if mask is not None:
        raise ValueError(
            "attn='te' takes sequence boundaries, not a dense attention mask: pass packed "
            "sequences as cu_seqlens or seq_idx and padding as a 2D attention_mask or "
            "padding_mask; an explicit 4D attention_mask or causal_mask_mapping needs "
            "attn='sdpa', 'flex' or 'eager'"
        )
    B, H, Q, D = q.shape
    if varlen is None:
        out = te_module(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.view(B, Q, H, D).transpose(1, 2)
    out = te_module(
        _to_thd(q, varlen.q_index),
        _to_thd(k, varlen.kv_index),
        _to_thd(v, varlen.kv_index),
        qkv_format="thd",
        attn_mask_type=varlen.attn_mask_type,
        cu_seqlens_q=varlen.cu_seqlens_q,
        cu_seqlens_kv=varlen.cu_seqlens_kv,
        max_seqlen_q=varlen.max_seqlen_q,
        max_seqlen_kv=varlen.max_seqlen_kv,
    ).reshape(-1, H * D)
    if varlen.q_index is not None:
        out = out.new_zeros(B * Q, H * D).index_copy(0, varlen.q_index, out)
    return out.view(B, Q, H, D).transpose(1, 2)


# Name (BackendConfig.attn) -> kernel. "tilelang" is accepted by BackendConfig but has no
# kernel here, so AttentionKernel rejects it by name.
ATTENTION_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": _sdpa,
    "eager": _eager,
    "flex": _flex,
    "te": _te,
}

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def build_te_attention(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dropout: float = 0.0,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> nn.Module:
    """One TE DotProductAttention per layer, built for the unpadded "bshd" path.

    `qkv_format` and `attn_mask_type` given here are defaults that TE's forward lets a
    call override (documented for both arguments); the "te" kernel overrides them with
    "thd" / "padding_causal[_bottom_right]" for packed or padded batches, so one module
    (one set of FP8 / backend state) serves both layouts. A sliding window W is TE's
    `window_size=(W - 1, 0)`: W - 1 keys to the left of the diagonal, none to the right.
    """
    if not _backend.HAVE_TE:
        raise ImportError("attn='te' needs transformer_engine; install the 'te' extra of am-dtype")
    import transformer_engine.pytorch as te

    extra = {}
    if scale is not None:
        extra["softmax_scale"] = scale
    if sliding_window is not None:
        extra["window_size"] = (sliding_window - 1, 0)
    return te.DotProductAttention(
        num_heads,
        head_dim,
        num_gqa_groups=num_kv_heads,
        attention_dropout=dropout,
        # Bottom-right alignment keeps decode rows (1 query, many cached keys) fully visible.
        attn_mask_type="causal_bottom_right",
        qkv_format="bshd",
        **extra,
    )


class AttentionKernel(nn.Module):
    """The attention of one layer after its projections: q, k, v [B, H, S, Dh] -> [B, H, Q, Dh].

    backend: a name of `ATTENTION_KERNELS` (`BackendConfig.attn`).
    scale: softmax scale, default head_dim**-0.5.
    dropout: attention-probability dropout, applied in training mode only.
    sliding_window: W keeps query i to keys i - W < j <= i; None = full causal.
    compile: wrap the kernel call in `torch.compile` (`BackendConfig.compile_attn`); not
        available with "te", whose kernels are already fused CUDA code.
    """

    def __init__(
        self,
        backend: str,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float | None = None,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        compile: bool = False,
    ):
        super().__init__()
        if backend not in ATTENTION_KERNELS:
            raise ValueError(
                f"BackendConfig.attn={backend!r} has no attention kernel; accepted: {sorted(ATTENTION_KERNELS)}"
            )
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} must be a positive multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        if sliding_window is not None and (
            isinstance(sliding_window, bool)
            or not isinstance(sliding_window, int)
            or sliding_window < 1
        ):
            raise ValueError(f"sliding_window={sliding_window!r} must be None or an int >= 1")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"attention dropout={dropout!r} must be in [0, 1)")
        if not isinstance(compile, bool):
            raise TypeError(f"compile={compile!r} must be a bool (BackendConfig.compile_attn)")
        if compile and backend == "te":
            raise ValueError(
                "compile_attn=True cannot be combined with attn='te': Transformer Engine's "
                "attention is already a fused CUDA kernel that torch.compile does not trace; "
                "use compile_attn=False with 'te', or attn='sdpa' / 'flex' / 'eager'"
            )
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.dropout_p = float(dropout)
        self.sliding_window = sliding_window
        self.compiled = compile
        kernel = ATTENTION_KERNELS[backend]
        self._kernel = torch.compile(kernel) if compile else kernel
        if backend == "te":
            self.te_attn = build_te_attention(
                num_heads,
                num_kv_heads,
                head_dim,
                self.dropout_p,
                scale=scale,
                sliding_window=sliding_window,
            )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        varlen: VarlenSeqs | None = None,
    ) -> torch.Tensor:
        """Attend; `mask` is read by sdpa / eager / flex (flex also takes a FlexAttention
        `BlockMask`), `varlen` by te (see the module doc)."""
        if self.backend != "flex" and is_block_mask(mask):
            raise ValueError(
                f"a FlexAttention BlockMask needs attn='flex', but this layer runs "
                f"attn={self.backend!r}; pass a dense [B, 1, Q, K] bool or additive mask instead"
            )
        return self._kernel(
            q,
            k,
            v,
            mask=mask,
            scale=self.scale,
            dropout_p=self.dropout_p if self.training else 0.0,
            sliding_window=self.sliding_window,
            varlen=varlen,
            te_module=getattr(self, "te_attn", None),
        )

    def extra_repr(self) -> str:
        window = f", sliding_window={self.sliding_window}" if self.sliding_window else ""
        return f"backend={self.backend!r}, scale={self.scale:.4g}{window}, compile={self.compiled}"


# --------------------------------------------------------------------------- THD boundaries


def build_varlen_seqs(
    q_len: int,
    kv_len: int,
    batch: int,
    token_mask: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> VarlenSeqs | None:
    """The pattern of `build_attention_mask` as THD sequence boundaries (attn='te').

    Returns None for plain causal attention (nothing packed or padded). Otherwise every
    sequence of every row becomes one THD sequence of its real tokens:

    - `cu_seqlens` (with a [1, T] batch and no padding) is used as given, in int32 (it must
      start at 0, strictly increase and end at T: `am_utils.validation.check_cu_seqlens`).
    - `seq_idx` [B, S]: each run of equal values in a row is a sequence (a sequence must be
      one contiguous run; a value that reappears later in the row is rejected, since the
      dense mask would join the two runs). Padded tokens (`token_mask` False) are left out.
    - `token_mask` alone (padded batch): each row's real tokens form one sequence; with a
      cache (q_len < kv_len) a row's queries are its last real keys, so the mask is
      "padding_causal_bottom_right".

    A sliding window is not part of the boundaries: TE applies it from its module
    (`build_te_attention`). Reading the lengths back costs a host sync
    or two per forward (not per layer): TE takes `max_seqlen_q/kv` as Python ints.
    """
    if token_mask is None and seq_idx is None:
        return None
    if seq_idx is not None and q_len != kv_len:
        raise ValueError("packed sequences (seq_idx / cu_seqlens) cannot be combined with a cache")
    if seq_idx is None:
        return _varlen_from_padding(q_len, kv_len, token_mask)
    if token_mask is None and cu_seqlens is not None and batch == 1:
        return _varlen_from_cu_seqlens(cu_seqlens.to(seq_idx.device), q_len)
    return _varlen_from_seq_idx(seq_idx.expand(batch, q_len), token_mask)


def _cu_from_counts(counts: torch.Tensor) -> torch.Tensor:
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


def _varlen_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> VarlenSeqs:
    # TE needs the longest length on the host: read the values once and check them too.
    values = check_cu_seqlens(cu_seqlens, total, force=True)
    longest = max(b - a for a, b in zip(values, values[1:], strict=False))
    cu = cu_seqlens.reshape(-1).to(torch.int32)
    return VarlenSeqs(cu, cu, longest, longest)


def _varlen_from_seq_idx(seq_idx: torch.Tensor, token_mask: torch.Tensor | None) -> VarlenSeqs:
    B, S = seq_idx.shape
    starts = torch.ones(B, S, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    run = starts.reshape(-1).cumsum(0)  # contiguous-run id of every token, row-major
    low, high, runs = torch.stack([seq_idx.min().long(), seq_idx.max().long(), run[-1]]).tolist()
    rows = torch.arange(B, device=seq_idx.device)[:, None]
    labels = rows * (high - low + 1) + (seq_idx - low)
    if runs != torch.unique(labels).numel():
        raise ValueError(
            "attn='te' needs every packed sequence to be one contiguous run of seq_idx values "
            "within a row"
        )
    index = None
    if token_mask is not None:
        index = token_mask.reshape(-1).nonzero().squeeze(1)
        run = run[index]
    counts = torch.unique_consecutive(run, return_counts=True)[1]
    cu = _cu_from_counts(counts)
    longest = int(counts.max()) if counts.numel() else 0
    return VarlenSeqs(cu, cu, longest, longest, q_index=index, kv_index=index)


def _varlen_from_padding(q_len: int, kv_len: int, token_mask: torch.Tensor) -> VarlenSeqs:
    keep_kv = token_mask[:, -kv_len:]
    keep_q = keep_kv[:, -q_len:]
    n_q, n_kv = keep_q.sum(1), keep_kv.sum(1)
    max_q, max_kv = torch.stack([n_q.max(), n_kv.max()]).tolist()
    return VarlenSeqs(
        _cu_from_counts(n_q),
        _cu_from_counts(n_kv),
        max_q,
        max_kv,
        q_index=keep_q.reshape(-1).nonzero().squeeze(1),
        kv_index=keep_kv.reshape(-1).nonzero().squeeze(1),
        attn_mask_type="padding_causal" if q_len == kv_len else "padding_causal_bottom_right",
    )
