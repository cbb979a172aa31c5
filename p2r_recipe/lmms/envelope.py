"""The envelope that carries a P2R record through lmms-eval inside the model's reply text.

lmms-eval hands a task's `process_results` nothing but the reply string, and its response
cache (`--use_cache`) stores nothing but that string; so, for this project's tasks, the
reply is the whole record as one JSON object `{"p2r_record": {...}}`. `<` and `>` are
written as JSON escapes, so lmms-eval's reasoning-tag stripping (`--reasoning_tags`,
on by default for `<think>`) can never cut into it. Task scoring reads only the record's
`answer`; lmms-eval's other tasks never see an envelope. Beside the record's own fields,
`passes` says which model on which backend produced each pass (`perceive`, `answer`), so a
logged sample of a mixed-roles run names both of its models.
"""

from __future__ import annotations

import json

from ..records import Record

KEY = "p2r_record"
_PREFIX = '{"' + KEY + '"'


def wrap(record: Record, passes: dict[str, dict[str, str]] | None = None) -> str:
    """The record as envelope text (its prompts left out: they follow from question and mode), with `passes`
    (pass name -> {"model", "backend", ...}) when given."""
    fields = record.to_dict()
    del fields["prompts"]
    if passes is not None:
        fields["passes"] = passes
    # ASCII escapes: lmms-eval writes replies as UTF-8, which cannot encode a lone surrogate a model may write.
    text = json.dumps({KEY: fields}, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e")


def unwrap(text: str) -> dict | None:
    """The record inside an envelope; None for any other text (a plain reply of another model).

    Raises ValueError for an envelope that cannot be read, so it is never scored as plain text.
    """
    text = text.strip() if isinstance(text, str) else ""
    if not text.startswith(_PREFIX):
        return None
    try:
        record = json.loads(text)[KEY]
        record.keys()  # an object, not some other JSON value
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"unreadable p2r record ({type(exc).__name__}: {exc})") from None
    return record
