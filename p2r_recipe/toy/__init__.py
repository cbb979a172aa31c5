"""The offline toy: synthetic scenes, the tiny Qwen3-VL (`p2r-tiny`) with its build and trainer, and the demo benchmark.

An example outside the core: the core meets it only in `p2r_recipe.engines.resolve_pretrained`, lazily.
"""
