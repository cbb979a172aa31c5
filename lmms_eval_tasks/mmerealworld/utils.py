"""MME-RealWorld (mmerealworld_p2r, mmerealworld_lite_p2r) for lmms-eval: binds p2r_recipe.lmms.tasks to the MMEREALWORLD record format (p2r_recipe.benchmarks)."""

from p2r_recipe.benchmarks import MMEREALWORLD
from p2r_recipe.lmms import tasks

mean_known, total, group_mean, group_total = tasks.mean_known, tasks.total, tasks.group_mean, tasks.group_total


def doc_to_visual(doc):
    return tasks.doc_to_visual(MMEREALWORLD, doc)


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return tasks.doc_to_text(MMEREALWORLD, doc, lmms_eval_specific_kwargs)


def process_results(doc, results):
    return tasks.process_results(MMEREALWORLD, doc, results)
