"""Test-only stand-in for vllm.inputs."""

TokensPrompt = dict
