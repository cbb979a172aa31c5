"""Test-only: run OpenRLHF's real `train_ppo_ray` argument parsing and validation on CPU, stopping where training starts.

Reads a JSON list of argument lists on stdin and prints, for each, the hierarchized namespace
OpenRLHF would train with (as nested JSON), or `{"exit": code, "stderr": text}` when its parser
or its checks reject the arguments. Its parser lives in the module's `__main__` block, so the
module is run as `__main__`; `train()` is stopped at `get_strategy(args)`, its first step after
`ray.init`, which is skipped by reporting Ray as initialised.
"""

import contextlib
import io
import json
import runpy
import sys
import types

import openrlhf.utils
import ray


class Parsed(Exception):
    def __init__(self, args):
        self.args_ns = args


def _stop(args):
    raise Parsed(args)


def _plain(value):
    if isinstance(value, types.SimpleNamespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse(argv: list[str]) -> dict:
    sys.argv = ["train_ppo_ray", *argv]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    except Parsed as parsed:
        return _plain(parsed.args_ns)
    except SystemExit as exc:
        return {"exit": exc.code, "stderr": stderr.getvalue()[-2000:]}
    except AssertionError as exc:
        return {"exit": "assert", "stderr": str(exc)}
    return {"exit": "returned without training", "stderr": stderr.getvalue()[-2000:]}


if __name__ == "__main__":
    ray.is_initialized = lambda: True
    openrlhf.utils.get_strategy = _stop
    print(json.dumps([parse(argv) for argv in json.loads(sys.stdin.read())]))
