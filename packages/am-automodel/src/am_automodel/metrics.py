"""Run logging: rank-0 progress bar, one metrics JSONL line per step, optional TensorBoard,
and the MoE expert-load monitor.

`RUN/metrics.jsonl` gets one JSON object per logged step (`loss`, `grad_norm`, `lr`,
`tokens_per_s`, `peak_mem_mb`, `epoch`, and for MoE models `moe_load_imbalance` = max/mean
tokens per expert averaged over MoE layers, `moe_aux_loss` when an aux loss is trained) and
one per evaluation (`eval_loss`). A resumed run first cuts the file back to the resumed step,
so the file always describes one consistent history.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ExpertLoadMonitor", "MetricsLogger", "peak_memory_mb", "read_metrics"]


def peak_memory_mb(device: str) -> float:
    """Peak accelerator memory (CUDA) or the process's peak resident memory (CPU), in MiB."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ExpertLoadMonitor:
    """Counts the tokens each MoE router sends to each expert (forward hooks on the gates)."""

    def __init__(self, model: nn.Module, reduce: bool = True) -> None:
        from am_moe.gate import Gate
        from am_moe.layers import MoE

        self.reduce = reduce  # False under PP: each rank holds different MoE layers
        self.moe_blocks = [m for m in model.modules() if isinstance(m, MoE)]
        self._counts: list[torch.Tensor | None] = [None] * len(self.moe_blocks)
        self._handles = []
        for i, block in enumerate(self.moe_blocks):
            if isinstance(block.gate, Gate) or hasattr(block.gate, "n_experts"):
                self._handles.append(block.gate.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(gate, _args, output):
            if not gate.training:
                return
            indices = output[1].detach().reshape(-1)
            prev = self._counts[i]
            if prev is None:
                prev = self._counts[i] = indices.new_zeros(gate.n_experts, dtype=torch.float32)
            # index_add_, not bincount: bincount sizes its output from the data (a host sync
            # on CUDA at every MoE layer's forward).
            prev.index_add_(0, indices, torch.ones_like(indices, dtype=torch.float32))

        return hook

    def pop(self) -> dict[str, float]:
        """Imbalance (max/mean load per layer, averaged) and aux loss since the last pop
        (one host sync for both)."""
        if not self.moe_blocks:
            return {}
        counts = [c for c in self._counts if c is not None]
        self._counts = [None] * len(self.moe_blocks)
        names, values = [], []
        if counts:
            stacked = torch.stack(counts)
            if self.reduce and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(stacked)
            per_layer = stacked.max(dim=1).values / stacked.mean(dim=1).clamp_min(1e-9)
            names.append("moe_load_imbalance")
            values.append(per_layer.mean())
        aux = [b.last_aux_loss for b in self.moe_blocks if b.last_aux_loss is not None]
        if aux:
            names.append("moe_aux_loss")
            values.append(torch.stack([a.detach().float() for a in aux]).sum())
        if not values:
            return {}
        device = values[0].device
        floats = torch.stack([v.to(device) for v in values]).tolist()
        return dict(zip(names, floats, strict=True))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every record of a metrics JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Writes metrics on rank 0 (JSONL, optional TensorBoard) and drives the progress bar."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, rank: int,
                 progress: bool, tensorboard: bool) -> None:  # fmt: skip
        self.rank = rank
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.tb = None
        self.total = total_steps
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", file=sys.stderr,
                            dynamic_ncols=True)  # fmt: skip
        if tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                print("logging.tensorboard: tensorboard is not installed; skipping it "
                      "(pip install 'am-automodel[tensorboard]')", file=sys.stderr)  # fmt: skip
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _truncate(self, start_step: int) -> None:
        """Keep only records of steps <= start_step (a resumed run redoes the later ones)."""
        if not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def log(self, record: dict, echo: bool = False) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 lr=f"{record['lr']:.2e}", refresh=False)  # fmt: skip
            self.bar.update(record["step"] - self.bar.n)
        if echo or (self.bar is None and "loss" in record):
            print(_format(record, self.total), flush=True)

    def close(self) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()


def _format(record: dict, total: int) -> str:
    if "eval_loss" in record:
        return f"step {record['step']:>5}/{total}  eval_loss {record['eval_loss']:.4f}"
    return (
        f"step {record['step']:>5}/{total}  loss {record['loss']:.4f}  "
        f"grad_norm {record['grad_norm']:.3f}  lr {record['lr']:.2e}  "
        f"tok/s {record['tokens_per_s']:,.0f}  eta {record.get('eta_s', 0):.0f}s"
    )
