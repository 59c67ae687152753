"""Train a tiny Nemotron-H (Mamba2 + attention + MLP + MoE) on the CPU, end to end.

What it shows, in order:
1. build the model from a transformers `NemotronHConfig` with our backends
   (pure-PyTorch SSD scan, grouped experts, sdpa attention);
2. train it for a few AdamW steps on a toy counting task (the loss must fall);
3. save a Hugging Face checkpoint with `save_pretrained`;
4. load that checkpoint into transformers' own `NemotronHForCausalLM` and check
   that its logits equal ours;
5. greedy-generate with the hybrid cache (KV for attention, conv/SSM state for Mamba).

Run it with `uv run python examples/quickstart.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import NemotronHConfig
from transformers import NemotronHForCausalLM as HFNemotronH

from am_dtype import BackendConfig
from am_models_nemotron import NemotronHForCausalLM
from am_utils import count_model_parameters


def tiny_config() -> NemotronHConfig:
    """A 4-layer hybrid: Mamba2, MoE, attention, MLP (every block type once)."""
    return NemotronHConfig(
        vocab_size=128,
        hidden_size=64,
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        chunk_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64,
        n_group=1,
        topk_group=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def counting_batch(batch: int, seq: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Rows that count upward (mod vocab) from a random start: learnable in a few steps."""
    start = torch.randint(3, vocab, (batch, 1), generator=generator)
    return 3 + (start - 3 + torch.arange(seq)) % (vocab - 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = tiny_config()
    backend = BackendConfig()
    model = NemotronHForCausalLM.from_config(config, backend=backend)
    model.initialize_weights(dtype=torch.float32)
    trainable, total = count_model_parameters(model)
    print(
        f"model: {total:,} parameters ({trainable:,} trainable); backend: {backend.experts} experts"
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        input_ids = counting_batch(args.batch, args.seq, config.vocab_size, gen)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    tokens = args.steps * args.batch * args.seq
    print(f"trained {args.steps} steps in {elapsed:.1f} s ({tokens / elapsed:,.0f} tokens/s)")
    if not losses[-1] < losses[0]:
        raise SystemExit(f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")

    model.eval()
    probe = counting_batch(2, args.seq, config.vocab_size, gen)
    with tempfile.TemporaryDirectory() as ckpt:
        model.save_pretrained(ckpt)
        reference = HFNemotronH.from_pretrained(ckpt, dtype=torch.float32).eval()
        with torch.no_grad():
            ours = model(input_ids=probe).logits
            theirs = reference(input_ids=probe).logits
        err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        print(f"checkpoint reloaded in transformers: max relative logit difference {err:.2e}")
        if err > 1e-4:
            raise SystemExit(f"transformers disagrees with our checkpoint: {err:.2e}")

    prompt = probe[:1, : args.seq // 2 + 4]
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    print("prompt   :", prompt[0].tolist())
    print("generated:", out[0, prompt.shape[1] :].tolist())
    print("quickstart: OK")


if __name__ == "__main__":
    main()
