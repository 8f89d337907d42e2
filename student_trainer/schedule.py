"""The GKD schedule: which completions a step trains on, drawn so that every rank agrees without talking.

With probability ``lmbda`` a step is on-policy (the student's own samples); otherwise it
uses teacher-generated completions under ``seq_kd`` and the dataset's completions if not
(TRL's GKD order). Draws come from (seed, step) alone, so a resumed run repeats them.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

Source = Literal["dataset", "student", "teacher"]


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (no ``hash()``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_source(seed: int, step: int, lmbda: float, seq_kd: bool) -> Source:
    """Where step ``step``'s completions come from."""
    if lmbda > 0 and random.Random(derived_seed(seed, step)).random() < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"
