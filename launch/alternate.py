#!/usr/bin/env python
"""K rounds of PRA-GRPO, each training the perceiver, then the reasoner (p2r_recipe/train/alternate.py says how).

  python launch/alternate.py --rounds 2 --run-dir runs/alt_4b --train-gpus 0,1,2,3 --service-gpus 4 --dry-run
"""

import sys
from pathlib import Path

from p2r_recipe.train.alternate import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).resolve().parent))
