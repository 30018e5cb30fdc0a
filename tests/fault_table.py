"""The fault-injection table: one row per scenario of `tests/e2e/test_bad_days.py`, printed at the
end of the test run (the README records it)."""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields


@dataclass(frozen=True)
class Row:
    """`failed_cleanly`: ended with a status that names what went wrong (never INTERNAL or
    UNKNOWN, never Ray's internals); `hung`: no end within the scenario's bound; `leaked_blocks`:
    KV blocks still held on any worker once the cluster is idle."""

    fault: str
    requests: int
    completed: int
    failed_cleanly: int
    hung: int
    leaked_blocks: int


ROWS: list[Row] = []


def format_table() -> str:
    header = [f.name.replace("_", " ") for f in fields(Row)]
    rows = [header] + [[str(v) for v in astuple(row)] for row in ROWS]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
