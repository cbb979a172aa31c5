"""PRA-GRPO on OpenRLHF: training data, stage-2 evidence, rewards, agents, and the frozen-role services.

OpenRLHF loads the reward and agent by file path: pass `REWARD_FILE` to `--reward.remote_url`
and `AGENT_FILE` to `--train.agent_func_path`.
"""

from pathlib import Path

REWARD_FILE = Path(__file__).with_name("reward.py")
AGENT_FILE = Path(__file__).with_name("agent.py")
