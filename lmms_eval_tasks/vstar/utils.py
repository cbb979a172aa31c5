"""V* (vstar, vstar_circular) for lmms-eval: binds p2r_recipe.lmms.tasks to the VSTAR record format (p2r_recipe.lmms.benchmarks)."""

from p2r_recipe.lmms import tasks
from p2r_recipe.lmms.benchmarks import VSTAR

mean_known, total, group_mean, group_total = tasks.mean_known, tasks.total, tasks.group_mean, tasks.group_total
circular_accuracy, letter_bias = tasks.circular_accuracy, tasks.letter_bias
doc_to_visual, doc_to_text, process_results, _rotations = tasks.bind(VSTAR)
process_docs = tasks.undecoded_images


def circular_docs(dataset):
    """`process_docs` of the circular variants: stored image bytes (as `process_docs`), each question once per rotation."""
    return _rotations(process_docs(dataset))


# V* has two hub copies (ours and lmms-eval 0.7.3's): a missing one makes the run read the other.
tasks.read_hub_copies()
