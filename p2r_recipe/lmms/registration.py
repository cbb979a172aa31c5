"""Registers P2R with lmms-eval: the `p2r` model manifest, and this project's task folder.

lmms-eval loads the entry points of group `lmms_eval.models` while `lmms_eval.models` is
imported, which in the CLI happens before its TaskManager indexes tasks. lmms-eval 0.7.3
has no way to register a task folder (no task entry point, no include-path variable;
`LMMS_EVAL_PLUGINS` is applied after the index is built) and its built-in tasks win every
name collision. So `manifest()` also wraps `TaskManager.initialize_tasks` at run time (the
one place this project reaches into lmms-eval; none of its files change) to index
`lmms_eval_tasks/` too: with `--model p2r` our names take precedence (`hrbench` is then
ours, offline-scored, not lmms-eval's GPT-judged group); for any other model lmms-eval's
own rule stands and our tasks only add names. Not covered: `lmms-eval tasks list` (the
subcommand never imports lmms_eval.models); `lmms-eval --tasks list` is.
tests/test_lmms_registration.py fails if a new lmms-eval breaks any of this.

`manifest()` also takes an `api_key=` out of `--model p2r`'s `--model_args` before lmms-eval
parses its command line (see `take_cli_key`): lmms-eval 0.7.3 redacts keys in the results
file but prints the model args verbatim, names W&B runs after them and hashes them into its
response cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

MODEL_ID = "p2r"
MODEL_CLASS = "p2r_recipe.lmms.model.P2R"


def tasks_dir() -> Path:
    """The folder of our task YAMLs, next to the `p2r_recipe` package: in the repository
    (source checkout, editable install) and in site-packages (wheel) alike."""
    return Path(__file__).resolve().parents[2] / "lmms_eval_tasks"


def index_our_tasks() -> None:
    """Make every TaskManager index our task folder too (idempotent)."""
    from lmms_eval.tasks import TaskManager

    builtin = TaskManager.initialize_tasks
    if getattr(builtin, "p2r_tasks", False):
        return

    def initialize_tasks(self, include_path=None, include_defaults=True):
        index = builtin(self, include_path=include_path, include_defaults=include_defaults)
        ours = builtin(self, include_path=[str(tasks_dir())], include_defaults=False)
        if getattr(self, "model_name", None) == MODEL_ID:
            return {**index, **ours}
        return {**ours, **index}

    initialize_tasks.p2r_tasks = True
    initialize_tasks.__doc__ = builtin.__doc__
    TaskManager.initialize_tasks = initialize_tasks


# The key `take_cli_key` took out of this process's command line; the model uses it before $P2R_API_KEY.
cli_api_key: str | None = None
REDACTED_PERCEIVER_KEY = "perceiver_api_key=<redacted>"


def take_cli_key(argv: list[str]) -> None:
    """Remove `api_key=...` from the `--model_args` of a `--model p2r` command line, in place, keeping it in
    `cli_api_key`, and blank the value of a `perceiver_api_key=...` (which the model refuses). lmms-eval loads
    this entry point before it parses `sys.argv`, so nothing it prints, writes or hashes holds either key (the
    kernel's copy of the command line still does: prefer the environment variables)."""
    global cli_api_key
    model = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--model"), None)
    model = model or next((a.split("=", 1)[1] for a in argv if a.startswith("--model=")), None)
    if model != MODEL_ID:
        return
    for i, arg in enumerate(argv):
        flag, value = ("--model_args", argv[i + 1]) if arg == "--model_args" and i + 1 < len(argv) else arg.partition("=")[::2]
        if flag != "--model_args":
            continue
        # A perceiver key is refused by the model; its value is blanked here so the refusal never prints it.
        pairs = [REDACTED_PERCEIVER_KEY if p.strip().startswith("perceiver_api_key=") else p for p in value.split(",")]
        keys = [p.split("=", 1)[1] for p in pairs if p.strip().startswith("api_key=")]
        if keys:
            cli_api_key = keys[-1]
        kept = ",".join(p for p in pairs if not p.strip().startswith("api_key="))
        if kept != value:
            if arg == "--model_args":
                argv[i + 1] = kept
            else:
                argv[i] = f"--model_args={kept}"


def manifest():
    """Entry point of group `lmms_eval.models`: the `p2r` model (a simple model class)."""
    # Imported here: importing lmms_eval.models is what loads this entry point.
    from lmms_eval.models.registry_v2 import ModelManifest

    take_cli_key(sys.argv)
    index_our_tasks()
    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
