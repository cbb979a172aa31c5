"""`p2r-build-tiny`: install the shipped toy, build a random-weight one for tests, or retrain the toy."""

from __future__ import annotations

import argparse
from pathlib import Path

from .model import WEIGHTS_DIR, build_tiny_model, default_tiny_dir, install_trained_model
from .trainer import STEPS, train


def main(argv: list[str] | None = None) -> None:
    """Console script `p2r-build-tiny`."""
    parser = argparse.ArgumentParser(prog="p2r-build-tiny", description=__doc__)
    parser.add_argument("--out", type=Path, help="default: $P2R_TINY_DIR, else ~/.cache/p2r_recipe/tiny-qwen3-vl")
    parser.add_argument("--random", action="store_true", help="random weights (for tests) instead of the trained toy")
    parser.add_argument("--seed", type=int, default=0, help="with --random: the initialisation seed")
    parser.add_argument("--train", action="store_true",
                        help=f"retrain the toy from scratch on the CPU: into --out if given (nothing else is done), "
                             f"else into {WEIGHTS_DIR}, then install as usual")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="with --train: optimiser steps")
    args = parser.parse_args(argv)
    if args.train:
        print(train(args.out or WEIGHTS_DIR, steps=args.steps or STEPS))
        if args.out:
            return
    out = args.out or default_tiny_dir()
    if args.random:
        print(build_tiny_model(out, seed=args.seed))
        print("The weights are random: the model's answers are meaningless.")
    else:
        print(install_trained_model(out))
        print("A toy trained on synthetic scenes: its demo scores are not a benchmark result.")


if __name__ == "__main__":
    main()
