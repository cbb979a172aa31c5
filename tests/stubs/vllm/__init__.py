"""Test-only stand-in for vllm: the names OpenRLHF imports at module top, no engine."""

__version__ = "0.0.0+p2r-test-stub"


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
