"""Tokenizer fingerprint: equal only when two tokenizers turn the same conversations into the same ids.

Teacher and student with different vocabularies still "train" - on the wrong tokens. A different chat
template, or a special token with another id or role, is a different tokenization of the same conversation,
so the fingerprint covers them too. Both sides compute it with this one function and the client refuses a
mismatch before the first step.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

_ROLES = ("bos_token", "eos_token", "unk_token")
"""Roles that change ids: BOS and EOS are added around text, UNK stands for what the vocabulary lacks.
PAD is left out: padding is masked, and a trainer may set it (to EOS) where a tokenizer has none."""


def _chat_template(tokenizer: Any) -> str | dict[str, str] | None:
    """The tokenizer's chat template: one string, named templates (a dict, or a list of {name, template}), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, list):  # the tokenizer_config.json form of named templates
        template = {str(t["name"]): str(t["template"]) for t in template}
    return template


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over a HF tokenizer's vocabulary (token -> id), its added tokens with their ids and special
    flags, the tokens holding the special roles, and its chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    added = [
        [int(i), str(getattr(tok, "content", tok)), bool(getattr(tok, "special", False))]
        for i, tok in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())
    ]
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    roles = {role: str(getattr(tokenizer, role, None)) for role in _ROLES}
    payload = json.dumps(
        {
            "vocab": vocab,
            "added": added,
            "special": special,
            "roles": roles,
            "chat_template": _chat_template(tokenizer),
        },
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()
