"""The tokenizer fingerprint: equal for equal tokenizers, different when anything that changes ids differs -
the vocabulary, an added or special token, the token in a special role, or the chat template."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoTokenizer

from demo.tiny import TinyAssets
from shared.fingerprint import tokenizer_fingerprint

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture
def load(tiny_assets: TinyAssets) -> Any:
    return lambda: AutoTokenizer.from_pretrained(tiny_assets.teacher)


def test_equal_tokenizers_have_equal_fingerprints(load: Any, tiny_assets: TinyAssets) -> None:
    a, b = load(), load()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a).startswith("sha256:")
    # the student ships the same tokenizer files: the handshake must pass
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_assets.student)) == tokenizer_fingerprint(a)
    a.chat_template = b.chat_template = TEMPLATE
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def test_only_the_chat_template_differs(load: Any) -> None:
    base, templated, other = load(), load(), load()
    templated.chat_template = TEMPLATE
    other.chat_template = TEMPLATE.replace("<|", "<")
    prints = {tokenizer_fingerprint(t) for t in (base, templated, other)}
    assert len(prints) == 3
    assert base.get_vocab() == templated.get_vocab()  # the vocabulary alone would not tell them apart


def test_named_templates(load: Any) -> None:
    a, b = load(), load()
    a.chat_template = {"default": TEMPLATE, "tool_use": TEMPLATE + "{{ tools }}"}
    b.chat_template = {"tool_use": TEMPLATE + "{{ tools }}", "default": TEMPLATE}  # order does not matter
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.chat_template = {"default": TEMPLATE, "tool_use": TEMPLATE}
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    # tokenizer_config.json's list form of named templates reads as the dict
    b.chat_template = [
        {"name": "default", "template": TEMPLATE},
        {"name": "tool_use", "template": TEMPLATE + "{{ tools }}"},
    ]
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def test_added_and_special_tokens(load: Any) -> None:
    base = tokenizer_fingerprint(load())
    added = load()
    added.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert tokenizer_fingerprint(added) != base
    role = load()
    role.eos_token = role.bos_token  # same vocabulary, another token ends a completion
    assert role.get_vocab() == load().get_vocab()
    assert tokenizer_fingerprint(role) != base
