"""`python -m p2r_recipe.train.prepare`: P2R-10k -> one role's OpenRLHF prompt datasets (training and held-out).

Stage 1 (`--role perceiver`) converts and writes `perceiver.jsonl`; stage 2 (`--role reasoner`) also asks the
frozen perceiver service for every sample's boxes (`precompute`). A summary JSON names every rejected row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from p2r_recipe.train.data import HUB_ID, VAL_SEED, VAL_SIZE, convert, hold_out, perceiver_row
from p2r_recipe.train.precompute import PrecomputeStopped, run
from p2r_recipe.train.schema import ROLES, val_path, write_json, write_jsonl
from p2r_recipe.train.services import ServiceConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2r_recipe.train.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=ROLES, required=True)
    parser.add_argument("--source", default=HUB_ID, help=f"hub dataset id, .parquet or .jsonl (default {HUB_ID})")
    parser.add_argument("--image-root", help="folder that image paths in the source are relative to")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--workers", type=int, help="image-verification threads")
    parser.add_argument("--cache", type=Path, help="reasoner role: perceiver cache (default OUT/perceiver_cache.jsonl)")
    parser.add_argument("--val-size", type=int, default=VAL_SIZE, help=f"prompts held out for validation (default {VAL_SIZE})")
    parser.add_argument("--val-seed", type=int, default=VAL_SEED, help=f"seed of the held-out slice (default {VAL_SEED})")
    args = parser.parse_args(argv)

    conversion = convert(args.source, args.out, args.image_root, args.workers)
    train, val = hold_out(conversion.samples, args.val_size, args.val_seed)
    summary = {"role": args.role, "conversion": conversion.summary()}
    summary["validation"] = {"size": len(val), "seed": args.val_seed, "ids": [s.id for s in val]}
    if args.role == "perceiver":
        output = write_jsonl(args.out / "perceiver.jsonl", map(perceiver_row, train))
        write_jsonl(val_path(output), map(perceiver_row, val))
        summary["output"], summary["written"] = str(output), len(train)
        code = 0
    else:
        perceiver = ServiceConfig.from_env("perceiver")
        try:
            summary["evidence"] = run(train, args.out, perceiver, args.cache)
            summary["evidence_val"] = run(val, args.out, perceiver, args.cache, name=val_path("reasoner.jsonl").name)
            code = 0
        except PrecomputeStopped as exc:
            summary["stopped"], code = str(exc), 1
            print(exc, file=sys.stderr)
    path = write_json(args.out / f"summary_{args.role}.json", summary)
    counts = summary["conversion"]
    print(
        f"{counts['samples']} samples, {counts['rejected']} rejected {counts['rejected_by_reason']}; summary: {path}",
        file=sys.stderr,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
