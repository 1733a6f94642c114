"""The feature matrix of `engine/features.py` as markdown: what `lckv-vllm features` prints and docs/features.md holds
verbatim (a test keeps them equal)."""

from __future__ import annotations

from ..engine.features import FEATURES, KIND_TITLES, PLAN_KINDS

_MARK = {"exact": "works", "bound": "works, bound", "untested": "untested (refused)", "refused": "**refused**"}


def markdown() -> str:
    """The matrix as markdown: the table, its numbered notes, and per feature what to do instead and where the suite
    covers it."""
    lines = ["| feature | " + " | ".join(KIND_TITLES[k] for k in PLAN_KINDS) + " |",
             "| --- |" + " --- |" * len(PLAN_KINDS)]
    notes: dict[str, int] = {}
    for f in FEATURES:
        row = []
        for k in PLAN_KINDS:
            c = f.cell(k)
            row.append(_MARK[c.status] + (f" [{notes.setdefault(c.note, len(notes) + 1)}]" if c.note else ""))
        lines.append(f"| {f.title} | " + " | ".join(row) + " |")
    lines += ["", "Notes:", ""] + [f"{n}. {note}" for note, n in notes.items()]
    lines += ["", "| key (`LCKV_ALLOW_UNTESTED`) | checked at start-up | when refused, instead | covered by |",
              "| --- | --- | --- | --- |"]
    for f in FEATURES:
        lines.append(f"| `{f.key}` | {'yes' if f.detect else 'no (per request)'} | {f.instead or '-'} | "
                     f"{f.tests or '-'} |")
    return "\n".join(lines) + "\n"
