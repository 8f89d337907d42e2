"""Merge pip constraints for installing the project into a prebuilt image (the vLLM one).

    python3 pin_image.py IMAGE_FREEZE PROJECT_CONSTRAINTS > merged.txt

IMAGE_FREEZE is ``pip freeze`` of the base image, PROJECT_CONSTRAINTS is deploy/constraints.txt.
Every package the image already has keeps the image's version (so installing the teacher never
swaps the image's torch, transformers or CUDA wheels); packages the image lacks get the project's
pin. Lines that are not ``name==version`` (editables, direct URLs, comments) are left out. Only the
standard library is used: the script runs in the image before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def normalize(name: str) -> str:
    """PEP 503 name normalization: `PyYAML`, `pyyaml` and `py_yaml` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines by normalized name (the rest is ignored)."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def merge(image: dict[str, str], project: dict[str, str]) -> dict[str, str]:
    """The image's version wins for every package it has; the project's pins fill in the rest."""
    return {**project, **image}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    image = parse_pins(Path(argv[0]).read_text())
    project = parse_pins(Path(argv[1]).read_text())
    for name, version in sorted(merge(image, project).items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
