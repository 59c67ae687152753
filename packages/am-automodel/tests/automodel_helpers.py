"""A tiny, fast recipe for the tests: a few steps of the tiny Nemotron-H on the built-in data."""

from __future__ import annotations


def tiny_raw(run_dir, **sections) -> dict:
    """A raw recipe mapping small enough to train in seconds on one core."""
    raw = {
        "model": {"preset": "tiny-nemotron-h", "backend": {"attn": "sdpa"}},
        "data": {"seq_len": 32, "builtin_documents": 60, "val_fraction": 0.1},
        "optimizer": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 4, "micro_batch_size": 2, "eval_every": 2, "eval_batches": 1},
        "checkpoint": {"dir": str(run_dir)},
        "logging": {"progress": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw
