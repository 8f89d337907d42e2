"""The flag reference of docs/trainer.md, generated from :class:`~student_trainer.config.TrainerConfig`.

python -m student_trainer.docs            # rewrite the table in docs/trainer.md
python -m student_trainer.docs --check    # exit 1 if it is out of date (the test suite runs this check)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from student_trainer.config import FLAG_GROUPS, build_parser

BEGIN = "<!-- BEGIN GENERATED FLAGS: python -m student_trainer.docs -->"
END = "<!-- END GENERATED FLAGS -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def flag_table() -> str:
    """Markdown tables, one per group: every flag with its aliases, default and help, as ``--help`` has them."""
    actions = {a.dest: a for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    lines: list[str] = []
    for title, names in [*FLAG_GROUPS.items(), ("Config file", ("config",))]:
        lines += [f"#### {title}", "", "| flag | default | what it does |", "|---|---|---|"]
        for name in names:
            action = actions[name]
            underscored = [o for o in action.option_strings if "-" not in o[2:]]  # hyphen spellings also work
            flags = ", ".join(f"`{o}`" for o in underscored)
            if action.required:
                default = "required"
            elif action.default is None:
                default = ""
            else:
                default = f"`{action.default}`"
            lines.append(f"| {flags} | {default} | {_cell(action.help or '')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render(doc: str) -> str:
    """``doc`` with the text between the markers replaced by the current table."""
    try:
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise ValueError(f"{DOC} lacks the markers {BEGIN!r} ... {END!r}") from None
    return f"{head}{BEGIN}\n{flag_table()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m student_trainer.docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/trainer.md is out of date; write nothing")
    p.add_argument("--doc", type=Path, default=DOC, help="the Markdown file holding the markers")
    args = p.parse_args(argv)
    current = args.doc.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{args.doc} is out of date: run `python -m student_trainer.docs`", file=sys.stderr)
            return 1
        return 0
    args.doc.write_text(wanted)
    print(f"wrote the flag reference into {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
