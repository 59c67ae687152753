"""The training recipe: typed sections, validated when loaded, before any model or process group.

A recipe is a YAML mapping of sections (`model`, `tokenizer`, `data`, `parallelism`,
`optimizer`, `train`, `checkpoint`, `logging`), each a pydantic model with `extra="forbid"`
and strict types, so an unknown key, a value of the wrong type or out of range is a
`RecipeError` whose one line names the key path, the value and what is accepted. Dotted
command-line overrides (`--optimizer.lr=1e-3`) are merged into the raw mapping first and go
through the same validation. After loading, nothing downstream sees a raw dict.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "CheckpointSection",
    "DataSection",
    "LoggingSection",
    "ModelSection",
    "OptimizerSection",
    "ParallelismSection",
    "Recipe",
    "RecipeError",
    "TokenizerSection",
    "TrainSection",
    "apply_overrides",
    "load_recipe",
    "recipe_help",
]


class RecipeError(ValueError):
    """A recipe (or a file it names) is wrong; the message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSection(_Section):
    """Which model to train: a built-in preset or a Hugging Face config/checkpoint directory."""

    preset: str | None = Field(None, description="built-in tiny model, e.g. tiny-nemotron-h")
    path: str | None = Field(None, description="HF config or checkpoint directory (local)")
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="fields set on the config after loading it"
    )
    dtype: Literal["float32", "bfloat16", "float64"] = Field(
        "float32", description="parameter dtype (fp32 master weights with mixed_precision)"
    )
    backend: dict[str, Any] = Field(
        default_factory=dict, description="am_dtype.BackendConfig fields (attn, experts, ...)"
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        from am_automodel.models import PRESETS

        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset; accepted: {sorted(PRESETS)}")
        return value

    @field_validator("backend")
    @classmethod
    def _valid_backend(cls, value: dict[str, Any]) -> dict[str, Any]:
        from dataclasses import fields

        from am_dtype import BackendConfig

        accepted = {f.name for f in fields(BackendConfig)} - {"te_fp8"}
        unknown = sorted(set(value) - accepted)
        if unknown:
            raise ValueError(
                f"unknown BackendConfig fields {unknown}; accepted: {sorted(accepted)}"
            )
        BackendConfig(**value)  # its own checks: names, installed extras
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of model.preset and model.path")
        return self


class TokenizerSection(_Section):
    """A local HF tokenizer directory, or None for the built-in byte-level tokenizer."""

    path: str | None = Field(None, description="AutoTokenizer directory; none = built-in bytes")


class DataSection(_Section):
    """Documents, tokenized and packed into fixed-length rows with per-document boundaries."""

    path: str | None = Field(
        None, description="JSONL / JSON / text / parquet file or directory; none = built-in"
    )
    format: Literal["auto", "json", "text", "parquet"] = Field(
        "auto", description="file format (auto: from the suffix)"
    )
    text_field: str = Field("text", description="column holding plain text")
    messages_field: str | None = Field(
        None, description="column holding chat messages [{role, content}] (instead of text)"
    )
    seq_len: int = Field(128, ge=8, le=1 << 20, description="tokens per packed row")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="documents held out for eval")
    val_path: str | None = Field(
        None, description="separate validation file (overrides val_fraction)"
    )
    builtin_documents: int = Field(
        2000, ge=10, description="size of the built-in embedded dataset (documents)"
    )
    shuffle: bool = Field(True, description="shuffle rows each epoch (seeded)")
    pack: bool = Field(
        True, description="pack documents into rows; false: one document per row, right-padded"
    )


class ParallelismSection(_Section):
    """Device and the DeviceMesh axes; their product must equal the world size."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA+NCCL if present, else CPU+gloo"
    )
    dp_shard: int = Field(-1, ge=-1, description="FSDP2 shard degree; -1 = what the others leave")
    dp_replicate: int = Field(1, ge=1, description="data-parallel replicas")
    ep: int = Field(1, ge=1, description="expert parallelism (divides the routed experts)")
    pp: int = Field(1, ge=1, description="pipeline stages (needs am-pp)")
    pp_schedule: str = Field("1F1B", description="pipeline schedule name (am-pp)")
    pp_microbatches: int | None = Field(None, ge=1, description="pipeline microbatches")
    cp: int = Field(1, ge=1, description="context parallelism (divides seq_len)")
    activation_checkpointing: bool = Field(False, description="recompute blocks in backward")
    mixed_precision: Literal["none", "bf16"] = Field(
        "none", description="bf16: bf16 compute, fp32 reduce and fp32 master weights (FSDP2)"
    )

    @field_validator("dp_shard")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be >= 1, or -1 for the rest of the world size")
        return value


class OptimizerSection(_Section):
    """AdamW and the learning-rate schedule."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0.0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="not applied to norms and biases")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0.0)
    fused: bool | None = Field(
        None, description="fused AdamW; none = wherever torch has the kernel (CPU, CUDA)"
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="after warmup")
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr / peak lr")
    max_grad_norm: float = Field(1.0, ge=0.0, description="clip the global grad norm; 0 = off")

    @field_validator("betas", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1)")
        return value


class TrainSection(_Section):
    """Steps, batch and evaluation."""

    steps: int = Field(60, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(8, ge=1, description="rows per rank per microbatch")
    grad_accum: int = Field(1, ge=1, description="microbatches per optimizer step")
    seed: int = Field(0, ge=0, description="model init, data order")
    eval_every: int = Field(20, ge=0, description="steps between eval losses; 0 = only at the end")
    eval_batches: int = Field(4, ge=1, description="validation global batches per eval")


class CheckpointSection(_Section):
    """DCP checkpoints for resume and Hugging Face exports."""

    dir: str = Field("runs/tiny", description="run directory (checkpoints, exports, metrics)")
    every: int = Field(0, ge=0, description="steps between DCP checkpoints; 0 = only at the end")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept")
    resume: str = Field("auto", description="auto (newest complete), never, or a checkpoint dir")
    export_every: int = Field(0, ge=0, description="steps between HF exports; 0 = only at the end")
    export_final: bool = Field(True, description="write RUN/hf/final at the end")


class LoggingSection(_Section):
    """Progress bar, metrics JSONL, optional TensorBoard."""

    progress: bool = Field(True, description="rank-0 progress bar")
    log_every: int = Field(1, ge=1, description="steps between printed/recorded metrics")
    tensorboard: bool = Field(False, description="also write TensorBoard events (if installed)")


class Recipe(_Section):
    """A whole training recipe."""

    model: ModelSection = Field(default_factory=lambda: ModelSection(preset="tiny-nemotron-h"))
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection = Field(default_factory=DataSection)
    parallelism: ParallelismSection = Field(default_factory=ParallelismSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (what was run, defaults included)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in Recipe.model_fields.items()
}


def _parse_scalar(text: str) -> Any:
    """A command-line value as YAML would read it, plus `1e-3` style floats (YAML 1.1 misses)."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge `section.key=value` (or `section.key.sub=value`) overrides into a raw mapping."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise RecipeError(f"override {item!r} is not of the form --section.key=value")
        dotted, value = text.split("=", 1)
        parts = dotted.split(".")
        if len(parts) < 2 or not all(parts):
            raise RecipeError(f"override {item!r}: the key must be section.key (e.g. optimizer.lr)")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part} is not a section or mapping")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return out


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_keys(loc: tuple) -> list[str]:
    """Accepted keys at a location inside the recipe (for unknown-key errors)."""
    model: Any = Recipe
    for part in loc:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return []
        model = fields[part].annotation
    return sorted(getattr(model, "model_fields", {}))


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if isinstance(p, str))
    path = ".".join(loc) or "recipe"
    if first["type"] == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        accepted = _section_keys(parent)
        what = "section" if not parent else "key"
        return (
            f"unknown {what} {path!r}{_suggest(key, accepted)}; accepted "
            f"{'sections' if not parent else 'keys of ' + '.'.join(parent)}: {accepted}"
        )
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{path}{shown}: {msg}{more}"


def build_recipe(raw: Any) -> Recipe:
    """Validate a raw mapping into a Recipe, or raise RecipeError with one line."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_error(err)) from None


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (None: the built-in tiny default), apply overrides, validate."""
    raw: Any = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise RecipeError(f"recipe file {str(file)!r} does not exist")
        try:
            raw = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise RecipeError(f"recipe {str(file)!r}{where}: not valid YAML") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe {str(file)!r} must be a mapping of sections")
    return build_recipe(apply_overrides(raw, list(overrides)))


def recipe_help() -> str:
    """Every section and key with its type, default and description (for --help)."""
    lines = []
    for name, section in SECTIONS.items():
        lines.append(f"{name}:  {section.__doc__.strip().splitlines()[0]}")
        for key, field in section.model_fields.items():
            default = field.get_default(call_default_factory=True)
            kind = getattr(field.annotation, "__name__", None) or str(field.annotation)
            kind = kind.replace("typing.", "")
            desc = f"  {field.description}" if field.description else ""
            lines.append(f"  {name}.{key} ({kind}, default {default!r}){desc}")
    return "\n".join(lines)
