"""Conversations through the student tokenizer's own chat template, with a mask of the assistant's tokens.

Where the template marks its assistant blocks (``{% generation %}``), transformers returns the mask
(``return_assistant_tokens_mask``). Otherwise each assistant turn is found by rendering the
conversation turn by turn: the tokens a turn adds after the generation prompt are its own, which
holds only if every rendered prefix is a token prefix of the whole; a template for which it does not
hold is refused rather than guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool"})
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class RowError(ValueError):
    """What is wrong with one row of a dataset (the caller adds where the row is)."""


def check_messages(messages: Any, field: str = "messages") -> list[dict[str, Any]]:
    """The turns of a conversation, each checked: a known role, and content (or tool calls) to train on."""
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{field} must be a non-empty list of {{'role', 'content'}} turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise RowError(f"{field}[{i}] is not an object with 'role' and 'content'")
        role = turn.get("role")
        if role is None:
            raise RowError(f"{field}[{i}] has no role")
        if role not in ROLES:
            raise RowError(f"{field}[{i}] has role {role!r}; expected one of {sorted(ROLES)}")
        content, calls = turn.get("content"), turn.get("tool_calls")
        if content is not None and not isinstance(content, str):
            raise RowError(f"{field}[{i}] ({role}) content must be a string")
        if role == "assistant" and not content and not calls:
            raise RowError(f"{field}[{i}] is an assistant turn with no content")
        if role != "assistant" and content is None:
            raise RowError(f"{field}[{i}] ({role}) has no content")
    return messages


def has_generation_blocks(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return isinstance(template, str) and _GENERATION_BLOCK.search(template) is not None


def _render(tokenizer: Any, messages: Sequence[dict[str, Any]], generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def render_with_assistant_mask(
    tokenizer: Any, messages: list[dict[str, Any]], prompt_turns: int = 0
) -> tuple[list[int], list[int]]:
    """(token ids, mask) of a conversation: mask 1 on the tokens of every assistant turn after ``prompt_turns``.

    ``prompt_turns`` > 0 leaves the first turns out of the mask (TRL's conversational prompt/completion:
    only the completion is trained).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise RowError("the student tokenizer has no chat template; conversations need one")
    if has_generation_blocks(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if prompt_turns:
            prompt = _render(tokenizer, messages[:prompt_turns], generation_prompt=True)
            if ids[: len(prompt)] != prompt:
                raise RowError("the chat template renders the prompt differently alone and in the conversation")
            mask = [0] * len(prompt) + mask[len(prompt) :]
        return ids, mask
    ids = _render(tokenizer, messages)
    mask = [0] * len(ids)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant" or i < prompt_turns:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else []
        through = _render(tokenizer, messages[: i + 1])
        if ids[: len(before)] != before or ids[: len(through)] != through or len(through) <= len(before):
            raise RowError(
                f"the chat template does not render turn {i} as a prefix of the whole conversation, so its "
                "assistant tokens cannot be told apart; use a template with {% generation %} blocks"
            )
        mask[len(before) : len(through)] = [1] * (len(through) - len(before))
    return ids, mask
