"""The `automodel` command: train, generate, plot.

    automodel train [RECIPE.yaml] [--section.key=value ...]   # no recipe: the tiny default
    automodel generate CHECKPOINT_DIR --prompt TEXT
    automodel plot RUN_DIR

Run `automodel train` directly for one process or under `torchrun --nproc-per-node N` for
many. Bad recipes and missing files end with one `automodel: error: ...` line (exit code 2);
real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from am_automodel.recipe import RecipeError, load_recipe, recipe_help

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="automodel",
        description="Train Hugging Face LMs from one recipe on one process or many "
        "(FSDP2, EP, PP, CP).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipe sections and keys (override any with --section.key=value):\n"
        + recipe_help(),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train from a recipe (YAML); no recipe: the built-in tiny default",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipe sections and keys (override any with --section.key=value):\n"
        + recipe_help(),
    )
    train.add_argument("recipe", nargs="?", help="recipe YAML file")
    gen = sub.add_parser("generate", help="sample text from an exported checkpoint directory")
    gen.add_argument("checkpoint", help="an export directory, e.g. RUN/hf/final")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    plot = sub.add_parser("plot", help="write RUN_DIR/metrics.png (needs matplotlib)")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None)
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key=value` / `--section.key value` overrides from other arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in name:
            if "=" not in arg and i + 1 < len(argv):
                arg, i = f"{arg}={argv[i + 1]}", i + 1
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `automodel` script and of `python -m am_automodel`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if overrides and args.command != "train":
        print(f"automodel: error: {overrides[0]!r}: overrides apply to train only", file=sys.stderr)
        return 2
    try:
        if args.command == "train":
            from am_automodel.train import run

            result = run(load_recipe(args.recipe, overrides))
            if int(os.environ.get("RANK", "0")) != 0:  # the summary once, from rank 0
                return 0
            if result.losses:
                first, last = min(result.losses), max(result.losses)
                print(f"automodel: done; loss {result.losses[first]:.4f} (step {first}) -> "
                      f"{result.losses[last]:.4f} (step {last})", flush=True)  # fmt: skip
            if result.eval_losses:
                step = max(result.eval_losses)
                print(f"automodel: eval loss {result.eval_losses[step]:.4f} (step {step})")
            if result.export_dir is not None:
                print(f"automodel: exported to {result.export_dir}")
        elif args.command == "generate":
            from am_automodel.generate import generate_text

            text = generate_text(args.checkpoint, args.prompt, args.max_new_tokens,
                                 args.temperature, args.top_k, args.seed)  # fmt: skip
            print(args.prompt + text)
        else:
            from am_automodel.plot import plot_run

            print(f"automodel: wrote {plot_run(args.run_dir, args.out)}")
    except RecipeError as err:
        print(f"automodel: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
