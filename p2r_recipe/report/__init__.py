"""Reports over lmms-eval outputs: the leaderboard tables and chart, and the published numbers beside them."""
