"""The demo group's aggregations; its tasks reuse the V* and HR-Bench templates (and their utils.py)."""

from p2r_recipe.lmms.tasks import group_mean, group_total

__all__ = ["group_mean", "group_total"]
