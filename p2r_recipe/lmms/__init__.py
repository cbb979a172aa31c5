"""lmms-eval integration: the `p2r` model, its entry-point manifest, and the scoring side of our task YAMLs."""
