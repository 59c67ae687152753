"""Pipeline-parallel hooks of NemotronHForCausalLM (used by am-pp's splitter and stages).

A stage is the model with parts set to None by the splitter; these methods tell a stage
what it is, keep the MTP heads on the last stage, and give torch.distributed.pipelining
the shapes of each stage's inputs and outputs (1 + D tensors with D MTP depths).
"""

from __future__ import annotations

import torch
from torch import nn

from am_models_nemotron.layers import BlockInputs, resolve_block_types
from am_models_nemotron.mtp import mtp_embed_inputs


class NemotronHPipelineMixin:
    """PP stage outputs, MTP embedding shift for PP, and the splitter hooks."""

    def _pp_stage_outputs(self, h, input_ids, embeds, inputs=None):
        """A pipeline stage's output tensors (see `forward`).

        The first stage shifts the MTP embeddings with its BlockInputs, so they respect packing
        when the microbatch's `cu_seqlens` / `seq_idx` / padding mask reach it. The last stage
        runs the MTP blocks with the BlockInputs built from the kwargs it receives itself;
        torch.distributed.pipelining hands microbatch kwargs to the first stage only. am-pp
        (`am_pp.pipeline_model`) carries the 2-D `attention_mask` to every stage, so every
        stage's blocks and the MTP heads see the padding; it rejects packing kwargs
        (`cu_seqlens` / `seq_idx`), which a later stage would not see.
        """
        is_first = self.model.embed_tokens is not None
        if self.mtp_config.enabled and is_first and not embeds:
            embeds = self._build_mtp_embed_inputs_for_pp(input_ids, inputs)
        if self.lm_head is None:
            return (h, *embeds) if self.mtp_config.enabled else h
        logits = self.lm_head(h)
        if self.mtp is None:
            return logits
        return (logits, *[self.lm_head(hd) for hd in self.mtp(h, tuple(embeds), inputs)])

    def _build_mtp_embed_inputs_for_pp(
        self, input_ids: torch.Tensor, inputs: BlockInputs | None = None
    ) -> tuple[torch.Tensor, ...]:
        """For each MTP depth d = 1..D, the embeddings of `input_ids` shifted left by d, the
        vacated tail filled with token id 0; built where embed_tokens lives.

        Returns a tuple of `num_nextn_predict_layers` tensors [B, S, H]; under
        PP they travel with the hidden states through every stage. `inputs` (the
        BlockInputs of this forward) also fill with token 0 the shifts that would cross a
        packed-sequence boundary or reach padding; None treats each row as one sequence.
        """
        if self.model.embed_tokens is None:
            raise ValueError("_build_mtp_embed_inputs_for_pp needs embed_tokens (first PP stage)")
        return mtp_embed_inputs(
            self.model.embed_tokens, input_ids, self.mtp_config.num_layers, inputs
        )

    def _is_pipeline_parallel_stage(self) -> bool:
        """True when a PP splitter trimmed this module (lm_head / embed_tokens None, layers removed)."""
        if hasattr(self, "lm_head") and self.lm_head is None:
            return True
        inner = getattr(self, "model", None)
        if inner is not None and hasattr(inner, "embed_tokens") and inner.embed_tokens is None:
            return True
        layers = getattr(inner, "layers", None) if inner is not None else None
        return layers is not None and len(layers) != len(resolve_block_types(self.config))

    def customize_pipeline_stage_modules(
        self,
        module_names_per_stage: list[list[str]],
        layers_prefix: str,
        text_model: nn.Module | None = None,
    ) -> list[list[str]]:
        """Pin the MTP head ("mtp") to the last stage's module list."""
        if self.mtp is None or not module_names_per_stage:
            return module_names_per_stage
        out = [list(names) for names in module_names_per_stage]
        for names in out[:-1]:
            if "mtp" in names:
                names.remove("mtp")
        if "mtp" not in out[-1]:
            out[-1].append("mtp")
        return out

    def get_pipeline_stage_metas(
        self, is_first: bool, microbatch_size: int, seq_len: int, dtype: torch.dtype
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Meta tensors of this stage's (inputs, outputs); with MTP each carries 1 + D tensors.

        The floating-point ones require grad, as the stage's real outputs do in training:
        torch.distributed.pipelining's static `PipelineStage(input_args=..., output_args=...)`
        takes `requires_grad` from them to decide which activations it receives as autograd
        leaves and which output gradients it exchanges (with plain meta tensors no gradient
        crosses a stage boundary and the first stage's backward fails). Without a backward
        (`has_backward` False or no grad mode) the stage ignores the flag.
        """
        B, S, H = microbatch_size, seq_len, self.config.hidden_size
        depth = self.mtp_config.num_layers

        def hidden(width=H):
            return torch.empty(B, S, width, dtype=dtype, device="meta", requires_grad=True)

        extra = tuple(hidden() for _ in range(depth))
        if is_first:
            inputs = (torch.empty(B, S, dtype=torch.long, device="meta"),)
        else:
            inputs = (hidden(), *extra)
        if self.lm_head is not None:
            vocab = self.config.vocab_size
            outputs = (hidden(vocab), *(hidden(vocab) for _ in range(depth)))
        else:
            outputs = (hidden(), *extra)
        return inputs, outputs
