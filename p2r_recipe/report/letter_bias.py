"""The leaderboard's letter-bias block: how often each run predicted each option letter, against the ground truth."""

from __future__ import annotations

from tabulate import tabulate

HEADER = ["Table", "Model", "Mode", "Task", "Predicted (% per letter)", "Ground truth (% per letter)"]


def shares(counts: dict[str, int], n: int) -> str:
    """`A 62 B 13 ...`: each letter's share of the samples, in %; '-' is the predictions without a letter."""
    return " ".join(f"{letter} {100 * count / n:.0f}" for letter, count in counts.items()) if n else "-"


def rows(tables: list) -> list[list[str]]:
    """One line per (table, run, task) whose results carry lmms-eval's `letter_bias` metric."""
    return [
        [table.name, row.model, row.mode, task, shares(bias["predicted"], bias["n"]), shares(bias["truth"], bias["n"])]
        for table in tables
        for row in table.rows
        for task, bias in getattr(row, "bias", {}).items()
    ]


def markdown(tables: list) -> str:
    """The block under the leaderboard's tables; '' when no run has letter_bias (results before it existed)."""
    lines = rows(tables)
    if not lines:
        return ""
    title = "### Letter bias (predicted option letters against the ground truth; '-' = no letter)"
    return f"{title}\n\n" + tabulate(lines, HEADER, "pipe", disable_numparse=True)
