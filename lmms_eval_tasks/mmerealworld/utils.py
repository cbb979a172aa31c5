"""MME-RealWorld (mmerealworld_p2r, mmerealworld_lite_p2r; and their _circular variants) for lmms-eval: binds p2r_recipe.lmms.tasks to the MMEREALWORLD record format (p2r_recipe.lmms.benchmarks)."""

from p2r_recipe.lmms import tasks
from p2r_recipe.lmms.benchmarks import MMEREALWORLD

mean_known, total, group_mean, group_total = tasks.mean_known, tasks.total, tasks.group_mean, tasks.group_total
circular_accuracy, letter_bias = tasks.circular_accuracy, tasks.letter_bias
doc_to_visual, doc_to_text, process_results, circular_docs = tasks.bind(MMEREALWORLD)
