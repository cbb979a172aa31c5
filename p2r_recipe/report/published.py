"""The paper's published accuracies (%, greedy decoding), shipped so that users' runs sit beside them."""

from __future__ import annotations

MAIN_COLUMNS = ("V* Attr", "V* Spatial", "V*", "HR4K FSP", "HR4K FCP", "HR4K", "HR8K FSP", "HR8K FCP", "HR8K")
MME_COLUMNS = ("overall", "P-OCR", "P-RS", "P-DT", "P-MO", "P-AD", "R-OCR", "R-DT", "R-MO", "R-AD")

# (model, mode) -> scores in column order. The paper's Avg column is not stored: the
# leaderboard derives it from V*, HR4K and HR8K exactly as the paper does. DeepEyes and
# ZoomEye ran their own agentic pipelines, hence mode "native".
MAIN = {
    ("Qwen3-VL-2B-Instruct", "default"): (73.0, 77.6, 74.9, 81.0, 59.8, 70.4, 70.8, 58.5, 64.6),
    ("Qwen3-VL-4B-Instruct", "default"): (79.1, 85.5, 81.7, 81.8, 66.0, 73.8, 73.8, 60.3, 67.0),
    ("Qwen3-VL-8B-Instruct", "default"): (84.3, 82.9, 83.8, 81.0, 68.5, 74.8, 73.3, 70.1, 70.1),
    ("DeepEyes-7B", "native"): (91.3, 88.2, 90.1, 91.3, 59.0, 75.1, 86.8, 58.5, 72.6),
    ("ZoomEye-7B", "native"): (93.9, 85.5, 90.6, 84.3, 55.0, 69.6, 88.5, 50.0, 69.3),
    ("P2R-2B", "p2r"): (84.3, 84.2, 84.3, 89.8, 60.1, 75.1, 86.8, 62.7, 74.8),
    ("P2R-4B", "p2r"): (92.2, 94.7, 93.2, 92.3, 71.5, 81.9, 92.0, 69.0, 80.5),
    ("P2R-8B", "p2r"): (92.2, 96.1, 93.7, 93.5, 71.5, 81.5, 94.5, 70.8, 82.6),
}
MME_LITE = {
    ("Qwen3-VL-4B-Instruct", "default"): (47.7, 88.0, 38.0, 80.0, 34.8, 33.7, 74.0, 77.0, 34.7, 31.8),
    ("Qwen3-VL-8B-Instruct", "default"): (50.4, 88.8, 49.3, 85.0, 36.4, 33.1, 81.0, 79.0, 38.7, 34.3),
    ("DeepEyes-7B", "native"): (53.2, 90.0, 52.7, 89.0, 43.3, 33.4, 76.0, 69.0, 44.0, 35.0),
    ("P2R-4B", "p2r"): (54.8, 88.8, 50.0, 86.0, 46.1, 39.1, 79.0, 78.0, 46.7, 39.5),
    ("P2R-8B", "p2r"): (57.4, 92.4, 58.7, 89.0, 44.5, 46.9, 81.0, 81.0, 46.7, 39.0),
}
# leaderboard table -> (columns, rows)
TABLES = {"main": (MAIN_COLUMNS, MAIN), "mme_lite": (MME_COLUMNS, MME_LITE)}


def published_scores(table: str) -> dict[tuple[str, str], dict[str, float]]:
    """(model, mode) -> {column: score} of one leaderboard table; empty where the paper has none."""
    columns, rows = TABLES.get(table, ((), {}))
    return {key: dict(zip(columns, scores, strict=True)) for key, scores in rows.items()}
