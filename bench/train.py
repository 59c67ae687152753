"""Training throughput: `automodel train` vs a bare hand-written loop vs transformers' Trainer.

Usage: python bench/train.py [--quick] [--steps N] [--threads T]

All three run in this process on the same Nemotron-H config (given to automodel as a
`model.path` config directory: hidden 256, blocks "MEM*", 8 experts top-2, packed 1024-token
rows of the built-in dataset, micro-batch 2), the same rows in the same order and the same
AdamW (lr 1e-3, betas (0.9, 0.95), weight decay 0.01, grad clip 1.0, cosine schedule):

  (a) `automodel train` (am_automodel.run, one process, no FSDP: what `automodel train
      recipe.yaml` runs); step time from its metrics.jsonl;
  (b) a bare loop over the same model class and batches: forward with seq_idx, summed
      cross-entropy / targets, backward, clip, step: the framework's overhead is (a) vs (b);
  (c) transformers' Trainer on transformers' NemotronHForCausalLM (what a user would pick),
      with the same rows (its model takes no packing boundaries; the work per token is the same).

Each reports the median step time over the steps after the first two (warm-up), as tokens/s.
Goals: automodel >= 95% of the bare loop (overhead <= 5%), >= 1.3x transformers' Trainer.
`--quick` (smoke run in tests/test_bench.py): hidden 64, 256-token rows, 4 steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def bench_config(quick: bool):
    from transformers import NemotronHConfig

    from am_automodel.tokenizer import BYTE_VOCAB_SIZE

    return NemotronHConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=64 if quick else 256,
        hybrid_override_pattern="MEM*",
        num_attention_heads=4 if quick else 8,
        num_key_value_heads=2,
        head_dim=16 if quick else 32,
        intermediate_size=128 if quick else 512,
        mamba_num_heads=4 if quick else 8,
        mamba_head_dim=16 if quick else 32,
        ssm_state_size=16 if quick else 64,
        n_groups=2,
        chunk_size=64 if quick else 128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32 if quick else 128,
        moe_shared_expert_intermediate_size=64 if quick else 256,
        n_group=1,
        topk_group=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )


def recipe_raw(config_dir: str, run_dir: str, args) -> dict:
    return {
        "model": {"path": config_dir, "backend": {"attn": "sdpa"}},
        "data": {"seq_len": args.seq_len, "builtin_documents": args.documents, "val_fraction": 0.0},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 1, "max_grad_norm": 1.0},
        "train": {"steps": args.steps, "micro_batch_size": args.batch, "eval_every": 0},
        "checkpoint": {"dir": run_dir, "resume": "never", "export_final": False, "every": 0},
        "logging": {"progress": False},
    }


def median_tok_s(step_seconds: list[float], tokens: int) -> float:
    return tokens / statistics.median(step_seconds[2:] or step_seconds)


def run_automodel(raw: dict) -> float:
    """Median tokens/s of `automodel train` (per-step times it logs)."""
    from am_automodel.recipe import build_recipe
    from am_automodel.train import run

    result = run(build_recipe(raw))
    records = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    tok_s = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return statistics.median(tok_s[2:] or tok_s)


def _batches(raw: dict, steps: int):
    from am_automodel.data import RowLoader, build_datasets
    from am_automodel.recipe import build_recipe
    from am_automodel.tokenizer import byte_tokenizer

    recipe = build_recipe(raw)
    rows, _ = build_datasets(recipe.data, byte_tokenizer(), recipe.train.seed)
    loader = RowLoader(rows, recipe.train.micro_batch_size, 0, 1, recipe.train.seed)
    return [loader.next_batch() for _ in range(steps)]


def _adamw(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    plain = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)


def run_bare(config, batches, steps: int) -> float:
    """Median tokens/s of a hand-written loop over our model class and the same batches."""
    from am_dtype import BackendConfig
    from am_models_nemotron import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(config, backend=BackendConfig(attn="sdpa"))
    model.initialize_weights(dtype=torch.float32)
    model.train()
    optimizer = _adamw(model)
    times = []
    for batch in batches[:steps]:
        t0 = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], seq_idx=batch["seq_idx"]).logits
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        (loss / (labels != -100).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return median_tok_s(times, batches[0]["input_ids"].numel())


def run_trainer(config, batches, steps: int, out_dir: str) -> float:
    """Median tokens/s of transformers' Trainer on transformers' NemotronHForCausalLM."""
    from transformers import NemotronHForCausalLM as HFNemotronH
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = HFNemotronH(config).float()
    rows = [
        {"input_ids": ids, "labels": ids} for batch in batches[:steps] for ids in batch["input_ids"]
    ]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=batches[0]["input_ids"].shape[0],
        max_steps=steps,
        learning_rate=1e-3,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        optim="adamw_torch",
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer]).train()
    return median_tok_s(timer.times, batches[0]["input_ids"].numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or (4 if args.quick else 12)
    args.seq_len = 256 if args.quick else 1024
    args.batch = 2
    args.documents = 200 if args.quick else 2000
    config = bench_config(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp + "/config")
        raw = recipe_raw(tmp + "/config", tmp + "/run", args)
        batches = _batches(raw, args.steps)
        tokens = batches[0]["input_ids"].numel()
        print(f"Nemotron-H hidden {config.hidden_size}, blocks MEM*, {args.batch} x {args.seq_len} "
              f"packed tokens per step, {args.steps} steps, {torch.get_num_threads()} threads")  # fmt: skip
        ours = run_automodel(raw)
        bare = run_bare(config, batches, args.steps)
        trainer = run_trainer(config, batches, args.steps, tmp + "/trainer")
    print(f"automodel train            : {ours:10,.0f} tokens/s")
    print(f"bare PyTorch loop          : {bare:10,.0f} tokens/s")
    print(f"transformers Trainer       : {trainer:10,.0f} tokens/s")
    print(f"automodel / bare loop      : {ours / bare:6.3f}  (goal >= 0.95: overhead <= 5%)")
    print(f"automodel / HF Trainer     : {ours / trainer:6.3f}  (goal >= 1.3)")
    print(f"tokens per step            : {tokens}")


if __name__ == "__main__":
    main()
