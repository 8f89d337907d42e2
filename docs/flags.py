"""The flag references of docs/teacher.md and docs/trainer.md, generated from the two command lines.

Each CLI is built from its settings class (``teacher_service.config.ServiceConfig``,
``student_trainer.config.TrainerConfig``), so the tables say what ``--help`` says: the flag,
its default and its help, between two marker lines in each guide.

    python docs/flags.py            # rewrite the tables
    python docs/flags.py --check    # exit 1 if a table is out of date (the test suite runs this)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # run as a script from anywhere: the packages live beside docs/

END = "<!-- END GENERATED FLAGS -->"


@dataclass(frozen=True)
class Reference:
    """One guide's generated section: where it is, and the parser and headings it is made from."""

    doc: Path
    command: str
    parser: Callable[[], argparse.ArgumentParser]
    groups: Callable[[], dict[str, tuple[str, ...]]]

    @property
    def begin(self) -> str:
        return f"<!-- BEGIN GENERATED FLAGS: {self.command} -->"


def _trainer_parser() -> argparse.ArgumentParser:
    from student_trainer.config import build_parser

    return build_parser()


def _trainer_groups() -> dict[str, tuple[str, ...]]:
    from student_trainer.config import FLAG_GROUPS

    return {**FLAG_GROUPS, "Config file": ("config",)}


def _teacher_parser() -> argparse.ArgumentParser:
    from teacher_service.cli import build_parser

    return build_parser()


def _teacher_groups() -> dict[str, tuple[str, ...]]:
    from teacher_service.config import ServiceConfig

    return {"": tuple(ServiceConfig.model_fields)}


REFERENCES = (
    Reference(DOCS / "teacher.md", "python docs/flags.py", _teacher_parser, _teacher_groups),
    Reference(DOCS / "trainer.md", "python docs/flags.py", _trainer_parser, _trainer_groups),
)


def _cell(text: str) -> str:
    text = re.sub(r" \(default: [^)]*\)$", "", text)  # the table has a default column
    return text.replace("|", "\\|").replace("\n", " ")


def _flags(action: argparse.Action) -> str:
    """The spellings a user types; HfArgumentParser's hyphenated duplicates of underscored flags are left out."""
    names = action.option_strings
    if any("_" in n for n in names):
        names = [n for n in names if "-" not in n[2:]]
    return ", ".join(f"`{n}`" for n in names)


def table(parser: argparse.ArgumentParser, groups: dict[str, tuple[str, ...]]) -> str:
    """Markdown tables, one per heading (none for ``""``), in the groups' order; every flag must be in one."""
    actions: dict[str, argparse.Action] = {}
    negations: dict[str, argparse.Action] = {}  # a True-by-default bool's `--no_<flag>`, listed beside it
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            (negations if a.dest in actions else actions)[a.dest] = a
    listed = [name for names in groups.values() for name in names]
    if sorted(listed) != sorted(actions):
        raise ValueError(f"flags and groups differ: {sorted(set(listed) ^ set(actions))}")
    lines: list[str] = []
    for title, names in groups.items():
        lines += [f"#### {title}", ""] if title else []
        lines += ["| flag | default | what it does |", "|---|---|---|"]
        for name in names:
            action = actions[name]
            default = "required" if action.required else "" if action.default is None else f"`{action.default}`"
            flags = _flags(action) + (f", {_flags(negations[name])}" if name in negations else "")
            lines.append(f"| {flags} | {default} | {_cell(action.help or '')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render(ref: Reference, text: str) -> str:
    """``text`` with the section between the markers replaced by the current table."""
    try:
        head, rest = text.split(ref.begin, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise ValueError(f"{ref.doc} lacks the markers {ref.begin!r} ... {END!r}") from None
    return f"{head}{ref.begin}\n{table(ref.parser(), ref.groups())}{END}{tail}"


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python docs/flags.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a guide is out of date; write nothing")
    args = p.parse_args(None if argv is None else list(argv))
    stale = []
    for ref in REFERENCES:
        current = ref.doc.read_text()
        wanted = render(ref, current)
        if wanted == current:
            continue
        if args.check:
            stale.append(ref.doc.name)
        else:
            ref.doc.write_text(wanted)
            print(f"wrote the flag reference into {ref.doc}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `python docs/flags.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
