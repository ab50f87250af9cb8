"""``tformer <verb>``: parses arguments, then calls one library function per verb."""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args: argparse.Namespace) -> int:
    from tformer.training import load_config, train

    config = load_config(args.recipe, args.overrides)
    result = train(config, resume=args.resume)
    print(f"run directory: {result.run_dir}")
    print(f"best checkpoint: {result.best_checkpoint}")
    print(f"stopped by: {result.stopped_by} at step {result.state.step}")
    return 130 if result.stopped_by == "interrupted" else 0


def _demo(args: argparse.Namespace) -> int:
    from tformer.demo import run_demo

    run_demo(args.recipe, args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tformer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="train a model from a recipe")
    p.add_argument("recipe", nargs="?", help="YAML recipe (omit for the defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.output_dir from its last checkpoint")
    p.set_defaults(func=_train)

    p = verbs.add_parser("demo", help="train on the embedded docstring corpus and show results")
    p.add_argument("recipe", nargs="?", help="recipe (default: recipes/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.recipe and "=" in args.recipe:  # only overrides were given
        args.overrides, args.recipe = [args.recipe, *args.overrides], None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    from tformer.data import DataError
    from tformer.training import CheckpointError, ConfigError, TrainingError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"tformer {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
