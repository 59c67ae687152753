"""Training throughput: `automodel train` vs a bare hand-written loop vs transformers' Trainer.

Usage: python bench/train.py [--quick] [--steps N] [--threads T] [--clock cpu|wall]

One model config for all three: am_automodel's `small-nemotron-h` preset (hidden 256, blocks
Mamba2 / MoE 8 experts top-2 / Mamba2 / attention), built as `automodel train` builds it
(`build_model_config`), packed 1024-token rows of the built-in dataset, micro-batch 2, the same
rows in the same order, fp32, the same thread count, and the same AdamW (lr 1e-3, betas
(0.9, 0.95), weight decay 0.01 except norms and biases, grad clip 1.0, cosine schedule):

  (a) `automodel train` (am_automodel.train.run, one process, no FSDP: what `automodel train
      recipe.yaml` runs);
  (b) a bare loop over the same model class and batches: forward with seq_idx, summed
      cross-entropy / targets, backward, clip, step; (a) vs (b) is the framework's overhead;
  (c) transformers' Trainer on transformers' NemotronHForCausalLM (what a user would pick),
      with the same rows. Its model takes no packing boundaries, so its attention is plain
      causal over each 1024-token row, across documents; ours attends within each document
      (what packed rows mean), which am-utils' sdpa runs as one causal call per document: less
      attention work than the Trainer's. The rest of the work per token is the same.

The three run at once, each in its own thread, taking steps in turns (`Baton`): a step runs
while the others wait, the order rotating every round (a b c, b c a, ...), and each step is
timed alone (wall, and this process's CPU seconds, the work done whatever share of a core
the scheduler gave; only the running thread works). So load from other processes hits
neighbouring steps of all three alike, and the same round's steps compare in pairs. The
first two steps of each (setup included) are warm-up. A fourth participant, a twin of the
bare loop, measures the noise of these ratios in the same run. The bare loop starts from
automodel's weights, so the two compute the same losses (printed: their largest difference).
All use torch's fused AdamW (automodel's default; the Trainer's default `adamw_torch_fused`).
Reported: median step time as tokens/s on CPU seconds at one thread (`bench/_timing.py`), the
paired-step ratios, and the load average. Also printed: the model alone, our fwd+bwd vs
transformers' on the same batch (interleaved repeats), the ceiling of the Trainer ratio (the
optimizer step is the same work for both and dilutes it), and the bare loop's optimizer+clip
share.

Goals: automodel >= 95% of the bare loop (overhead <= 5%), >= 1.3x transformers' Trainer.

Measured (2026-12-01 18:07-18:14, 1 thread, CPU seconds, `--steps 40`, load 3.0 -> 4.2 on 2
cores): automodel 2,705 tokens/s, bare loop 2,722, Trainer 1,946; automodel / bare 0.994
(paired steps: median 0.990, quartiles 0.918-1.043), automodel / Trainer 1.390 (paired 1.376),
bare twin / bare 1.029 (paired 0.996: the noise floor of a median ratio here is ~3%); losses
automodel vs bare within 5.6e-8 relative over 40 steps; model fwd+bwd 1.32x; optimizer+clip
0.9% of a step (fused AdamW: 3.3 vs 13.1 ms for the per-tensor loop). The in-process A/B of
automodel's `_train_step` against the bare step on the same batches, before this layout (both
on the per-tensor AdamW), gave 1.6% overhead (load ~3).
Measured 2026-12-02 (1 thread, CPU seconds, `--steps 20`), before and after sdpa ran
packed-document masks one document at a time (the old dense path forced by replacing
`am_utils.attention._causal_segments` with `lambda *a: None`), two pairs:

  | run (UTC) | load start -> end | automodel tok/s | Trainer tok/s | / Trainer (paired) | model fwd+bwd | / bare |
  |---|---|---|---|---|---|---|
  | dense mask, 01:17 | 3.8 -> 3.9 | 4,875 | 3,799 | 1.283 (1.267) | 1.347 | 0.974 |
  | per document, 01:13 | 6.4 -> 5.1 | 6,449 | 3,930 | 1.641 (1.682) | 1.746 | 0.969 |
  | per document, 01:35 | 2.7 -> 2.6 | 7,673 | 4,288 | 1.789 (1.793) | 1.792 | 0.975 |
  | dense mask, 01:37 | 2.6 -> 2.8 | 5,493 | 4,349 | 1.263 (1.261) | 1.455 | 0.949 |

The twin / bare noise ratio was 0.98-1.04 in these runs.
`--quick` (smoke run in tests/test_bench.py): the tiny-nemotron-h preset, 128-token rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import CLOCKS, default_clock, fix_threads, interleaved, load_average  # noqa: E402

warnings.filterwarnings("ignore")
WARMUP_STEPS = 2


def recipe_raw(args, run_dir: str) -> dict:
    return {
        "model": {"preset": args.preset, "backend": {"attn": "sdpa"}},
        "data": {"seq_len": args.seq_len, "builtin_documents": args.documents, "val_fraction": 0.0},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 1, "max_grad_norm": 1.0},
        "train": {"steps": args.steps, "micro_batch_size": args.batch, "eval_every": 0},
        "checkpoint": {"dir": run_dir, "resume": "never", "export_final": False, "every": 0},
        "logging": {"progress": False},
    }


class Baton:
    """Runs the frameworks one step at a time, in turn, each in its own thread.

    A participant calls `turn(name)` once before its first step and `step_done(name)` at the
    end of every step; it then waits while the others take their step. The coordinator
    (`run`) gives the turns in a rotating order (a b c, b c a, c a b, ...) and times each
    turn: wall seconds and this process's CPU seconds (only the running participant works, so
    they are that step's). A burst of load from other processes thus hits neighbouring steps
    of all three alike, and consecutive steps can be compared in pairs.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.go = {n: threading.Semaphore(0) for n in names}
        self.done = threading.Semaphore(0)
        self.steps: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        self.rounds: list[dict[str, tuple[float, float]]] = []
        self.errors: dict[str, BaseException] = {}
        self.finished: set[str] = set()

    def turn(self, name: str) -> None:
        self.go[name].acquire()

    def step_done(self, name: str) -> None:
        self.done.release()
        self.go[name].acquire()

    def run(self, targets: dict[str, Callable[[], object]]) -> dict[str, object]:
        results: dict[str, object] = {}

        def body(name: str) -> None:
            try:
                self.turn(name)
                results[name] = targets[name]()
            except BaseException as err:  # noqa: BLE001 - re-raised in the coordinator
                self.errors[name] = err
            finally:
                self.finished.add(name)
                self.done.release()

        threads = [threading.Thread(target=body, args=(n,), daemon=True) for n in self.names]
        for t in threads:
            t.start()
        r = 0
        while len(self.finished) < len(self.names):
            active = [n for n in self.names if n not in self.finished]
            k = r % len(active)
            this_round = {}
            for name in active[k:] + active[:k]:
                wall0, cpu0 = time.perf_counter(), time.process_time()
                self.go[name].release()
                self.done.acquire()
                if name not in self.finished:  # the turn ended with a step
                    this_round[name] = (time.perf_counter() - wall0, time.process_time() - cpu0)
                    self.steps[name].append(this_round[name])
            self.rounds.append(this_round)
            r += 1
            if self.errors:
                name, err = next(iter(self.errors.items()))
                raise RuntimeError(f"{name} failed") from err
        for t in threads:
            t.join()
        return results

    def counted(self, name: str) -> list[tuple[float, float]]:
        """`name`'s step times after the warm-up (turn 1 also holds its setup)."""
        return self.steps[name][WARMUP_STEPS:]

    def paired_ratios(self, a: str, b: str, clock: str) -> list[float]:
        """time(b) / time(a) of the same round's steps, after the warm-up."""
        i = 0 if clock == "wall" else 1
        return [r[b][i] / r[a][i] for r in self.rounds[WARMUP_STEPS:] if a in r and b in r]


def run_automodel(raw: dict, baton: Baton) -> dict[int, float]:
    """`automodel train` as the CLI runs it; a step ends when its metrics line is written."""
    from am_automodel import metrics
    from am_automodel.recipe import build_recipe
    from am_automodel.train import run

    log = metrics.MetricsLogger.log

    def stamped(self, record, echo=False):
        log(self, record, echo)
        if "loss" in record:
            baton.step_done("automodel")

    metrics.MetricsLogger.log = stamped
    try:
        return run(build_recipe(raw)).losses
    finally:
        metrics.MetricsLogger.log = log


def _setup(raw: dict):
    """The config, the rows of every step (in automodel's order) and the starting weights."""
    from am_automodel.data import RowLoader, build_datasets
    from am_automodel.models import build_model_config, initial_state_dict
    from am_automodel.recipe import build_recipe
    from am_automodel.tokenizer import byte_tokenizer
    from am_dtype import BackendConfig

    recipe = build_recipe(raw)
    tokenizer = byte_tokenizer()
    config = build_model_config(recipe.model, len(tokenizer))
    rows, _ = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    loader = RowLoader(rows, recipe.train.micro_batch_size, 0, 1, recipe.train.seed)
    batches = [loader.next_batch() for _ in range(recipe.train.steps)]
    backend = BackendConfig(**recipe.model.backend)
    weights = initial_state_dict(recipe.model, config, backend, recipe.train.seed)
    return config, batches, weights


def _adamw(model, fused: bool = True):
    from am_automodel.optim import _no_decay

    decay = [p for n, p in model.named_parameters() if not _no_decay(n, p)]
    plain = [p for n, p in model.named_parameters() if _no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def _our_model(config, weights=None):
    from am_dtype import BackendConfig
    from am_models_nemotron import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(config, backend=BackendConfig(attn="sdpa"))
    model.initialize_weights(dtype=torch.float32)
    if weights is not None:
        model.load_state_dict(weights)
    return model.train()


def _loss(model, batch):
    from am_utils.loss import IGNORE_INDEX, next_token_targets

    logits = model(input_ids=batch["input_ids"], seq_idx=batch["seq_idx"]).logits
    targets = next_token_targets(batch["labels"], batch["seq_idx"])
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    return loss / (targets != IGNORE_INDEX).sum()


def run_bare(config, batches, weights, baton: Baton, name: str = "bare"):
    """A hand-written loop over our model class, automodel's starting weights and the same
    batches, with the same fused AdamW and cosine-after-warmup lr; returns its losses and the
    median share of a step spent in clip + optimizer step."""
    from am_automodel.optim import lr_factor
    from am_automodel.recipe import OptimizerSection

    model = _our_model(config, weights)
    optimizer = _adamw(model)
    section = OptimizerSection(lr=1e-3, weight_decay=0.01, warmup_steps=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, len(batches), section)
    )
    losses, opt_share = {}, []
    for step, batch in enumerate(batches, 1):
        t0 = time.process_time()
        loss = _loss(model, batch)
        loss.backward()
        t1 = time.process_time()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        t2 = time.process_time()
        opt_share.append((t2 - t1) / max(t2 - t0, 1e-9))
        losses[step] = loss.item()
        baton.step_done(name)
    return losses, statistics.median(opt_share[WARMUP_STEPS:] or opt_share)


def _hf_model(config):
    from transformers import NemotronHForCausalLM as HFNemotronH

    torch.manual_seed(0)
    return HFNemotronH(config).float().train()


def run_trainer(config, batches, out_dir: str, baton: Baton) -> None:
    """transformers' Trainer on transformers' NemotronHForCausalLM, same rows in order, with
    its default optimizer (torch's fused AdamW)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = _hf_model(config)
    rows = [{"input_ids": ids, "labels": ids} for batch in batches for ids in batch["input_ids"]]

    class Turns(TrainerCallback):
        def on_step_end(self, *a, **k):
            baton.step_done("trainer")

    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=batches[0]["input_ids"].shape[0],
        max_steps=len(batches),
        learning_rate=1e-3,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        optim="adamw_torch_fused",
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # the same rows in automodel's order
    )
    threads = torch.get_num_threads()
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Turns()]).train()
    if torch.get_num_threads() != threads:
        raise RuntimeError(
            f"Trainer changed the thread count {threads} -> {torch.get_num_threads()}"
        )


def model_only(config, batch, repeats: int, clock: str) -> tuple[float, float]:
    """Median seconds of one fwd+bwd of our model and of transformers' (interleaved)."""
    ours, theirs = _our_model(config), _hf_model(config)  # each freshly initialized

    def ours_step():
        _loss(ours, batch).backward()
        ours.zero_grad(set_to_none=True)

    def theirs_step():
        ids = batch["input_ids"]
        theirs(input_ids=ids, labels=ids).loss.backward()
        theirs.zero_grad(set_to_none=True)

    timing = interleaved({"ours": ours_step, "theirs": theirs_step}, repeats)
    return timing["ours"].median(clock), timing["theirs"].median(clock)


def _quartiles(ratios: list[float]) -> str:
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"median {q2:.3f}, quartiles {q1:.3f}-{q3:.3f}"


def _median(steps: list[tuple[float, float]], clock: str) -> float:
    return statistics.median(cpu if clock == "cpu" else wall for wall, cpu in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="steps per framework (default 20)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=CLOCKS, default=None)
    args = parser.parse_args()
    threads = fix_threads(args.threads)
    clock = args.clock or default_clock(threads)
    args.steps = args.steps or (4 if args.quick else 20)
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps {args.steps}: needs more than the {WARMUP_STEPS} warm-up steps")
    args.preset = "tiny-nemotron-h" if args.quick else "small-nemotron-h"
    args.seq_len = 128 if args.quick else 1024
    args.batch = 2
    args.documents = 200 if args.quick else 2000
    print(load_average(), "(start)")
    cpu0 = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        raw = recipe_raw(args, tmp + "/run")
        config, batches, weights = _setup(raw)
        tokens = batches[0]["input_ids"].numel()
        print(f"{args.preset}: Nemotron-H hidden {config.hidden_size}, blocks "
              f"{config.layers_block_type}, {args.batch} x {args.seq_len} packed tokens per step, "
              f"{args.steps} steps ({WARMUP_STEPS} warm-up) per framework, taken in turns, "
              f"{threads} thread(s), clock {clock}")  # fmt: skip
        baton = Baton(["automodel", "bare", "trainer", "twin"])
        out = baton.run({
            "automodel": lambda: run_automodel(raw, baton),
            "bare": lambda: run_bare(config, batches, weights, baton),
            "twin": lambda: run_bare(config, batches, weights, baton, "twin"),
            "trainer": lambda: run_trainer(config, batches, f"{tmp}/trainer", baton),
        })  # fmt: skip
        ours_fb, theirs_fb = model_only(config, batches[0], 3 if args.quick else 7, clock)
    am_losses, (bare_losses, share) = out["automodel"], out["bare"]
    loss_diff = max(abs(am_losses[s] - bare_losses[s]) / abs(bare_losses[s]) for s in bare_losses)
    steps = {name: baton.counted(name) for name in ("automodel", "bare", "trainer")}
    tok_s = {name: tokens / _median(s, clock) for name, s in steps.items()}
    ours, bare, trainer = tok_s["automodel"], tok_s["bare"], tok_s["trainer"]
    spread = {n: (min(tokens / (c if clock == "cpu" else w) for w, c in s),
                  max(tokens / (c if clock == "cpu" else w) for w, c in s)) for n, s in steps.items()}  # fmt: skip
    model_ratio = theirs_fb / ours_fb
    for label, name in (("automodel train", "automodel"), ("bare PyTorch loop", "bare"),
                        ("transformers Trainer", "trainer")):  # fmt: skip
        lo, hi = spread[name]
        print(f"{label:<27}: {tok_s[name]:10,.0f} tokens/s  (median of {len(steps[name])} steps; "
              f"range {lo:,.0f}-{hi:,.0f})")  # fmt: skip
    paired = {(a, b): _quartiles(baton.paired_ratios(a, b, clock))
              for a, b in (("automodel", "bare"), ("automodel", "trainer"), ("twin", "bare"))}  # fmt: skip
    print(f"automodel / bare loop      : {ours / bare:6.3f}  (goal >= 0.95: overhead <= 5%; "
          f"the same rounds' step ratios {paired['automodel', 'bare']})")  # fmt: skip
    print(f"automodel / HF Trainer     : {ours / trainer:6.3f}  (goal >= 1.3; "
          f"the same rounds' step ratios {paired['automodel', 'trainer']})")  # fmt: skip
    twin = tokens / _median(baton.counted("twin"), clock)
    print(f"bare loop twin / bare loop : {twin / bare:6.3f}  (the same loop twice: the noise of "
          f"these ratios; step ratios {paired['twin', 'bare']})")  # fmt: skip
    print(
        f"bare loop / HF Trainer     : {bare / trainer:6.3f}  (same loop work, our model vs theirs)"
    )
    print(f"losses automodel vs bare   : max rel diff {loss_diff:.1e} over {len(bare_losses)} "
          "steps (same weights, rows and optimizer: the same work)")  # fmt: skip
    print(f"model fwd+bwd, ours / HF   : {model_ratio:6.3f}  (x faster; {ours_fb * 1e3:.0f} vs "
          f"{theirs_fb * 1e3:.0f} ms {clock})")  # fmt: skip
    ceiling = 1.0 / ((1 - share) / model_ratio + share)
    print(f"Trainer-ratio ceiling      : {ceiling:6.3f}  (model ratio diluted by the optimizer+clip "
          f"share {share:.1%} of a bare step, same work for both)")  # fmt: skip
    print(f"tokens per step            : {tokens}")
    print(f"bench CPU seconds          : {time.process_time() - cpu0:.0f}")
    print(load_average(), "(end)")


if __name__ == "__main__":
    main()
