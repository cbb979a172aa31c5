#!/usr/bin/env python
"""Stage 1 of PRA-GRPO: train the perceiver role with OpenRLHF (GRPO); the frozen reasoner and the verifier answer behind services.

  launch/start_reasoner_server.sh            # the base model as frozen reasoner (its own GPUs)
  launch/start_verifier_server.sh MODEL      # judges free-form answers
  python launch/train_perceiver.py           # or: deepspeed launch/train_perceiver.py
  python launch/train_perceiver.py --dry-run --set learning_rate=2e-6

Defaults: launch/configs/perceiver_4b.yaml (the release's Qwen3-VL-4B-Instruct, 4 GPUs); perceiver_2b/_8b too.
Before starting it checks that the reasoner and verifier answer, the dataset is a perceiver dataset, and
the GPUs are visible. --joint trains the joint P2R agent instead (launch/configs/joint_4b.yaml).
"""

import sys
from pathlib import Path

from p2r_recipe.train.launch import main

if __name__ == "__main__":
    sys.exit(main("perceiver", __doc__, Path(__file__).resolve().parent / "configs", joint=True))
