#!/usr/bin/env python
"""Stage 2 of PRA-GRPO: train the reasoner role with OpenRLHF (GRPO) from the stage-1 checkpoint, on precomputed evidence.

  launch/start_perceiver_server.sh runs/perceiver_4b      # the stage-1 perceiver, frozen
  python -m p2r_recipe.train.precompute --input data/p2r10k/perceiver.jsonl --out data/stage2_4b
  launch/start_perceiver_server.sh --stop                 # precompute was its only client
  launch/start_verifier_server.sh MODEL
  python launch/train_reasoner.py                         # or: deepspeed launch/train_reasoner.py

Defaults: launch/configs/reasoner_4b.yaml (pretrain = runs/perceiver_4b, 4 GPUs); reasoner_2b/_8b too.
Before starting it checks that the verifier answers, pretrain is an HF checkpoint directory, the
dataset holds the precomputed evidence prompts, and the GPUs are visible.
"""

import sys
from pathlib import Path

from p2r_recipe.train.launch import main

if __name__ == "__main__":
    sys.exit(main("reasoner", __doc__, Path(__file__).resolve().parent / "configs"))
