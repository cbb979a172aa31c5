"""HR-Bench (hrbench_4k, hrbench_8k, group hrbench) for lmms-eval: binds p2r_recipe.lmms.tasks to the HRBENCH record format (p2r_recipe.benchmarks)."""

from p2r_recipe.benchmarks import HRBENCH
from p2r_recipe.lmms import tasks

mean_known, total, group_mean, group_total = tasks.mean_known, tasks.total, tasks.group_mean, tasks.group_total


def doc_to_visual(doc):
    return tasks.doc_to_visual(HRBENCH, doc)


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return tasks.doc_to_text(HRBENCH, doc, lmms_eval_specific_kwargs)


def process_results(doc, results):
    return tasks.process_results(HRBENCH, doc, results)
