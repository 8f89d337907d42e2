"""The guides say what the code does: flag references generated from the CLIs, links that resolve."""

from __future__ import annotations

import re
import subprocess
import sys

from support import REPO

from student_trainer.config import build_parser as trainer_parser
from teacher_service.cli import build_parser as teacher_parser


def test_flag_references_are_generated_from_the_current_command_lines() -> None:
    proc = subprocess.run([sys.executable, "docs/flags.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for guide, parser in (("teacher.md", teacher_parser()), ("trainer.md", trainer_parser())):
        text = (REPO / "docs" / guide).read_text()
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert f"`{action.option_strings[0]}`" in text, f"docs/{guide} lacks {action.option_strings[0]}"


def test_relative_links_in_the_readme_and_guides_resolve() -> None:
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links {target}, which does not exist"
