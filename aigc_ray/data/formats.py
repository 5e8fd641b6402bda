"""Supervised fine-tuning (chat) formatting: messages -> token ids + labels masking the prompt.

With a tokenizer that has a chat template, the template renders the conversation and the
assistant spans are found by rendering prefixes; without one, the documented default is:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}<eos>

Only assistant content (and the EOS that ends each assistant turn) gets labels; every other
token is -100, so the loss ignores prompts.
"""

from __future__ import annotations

import json

from aigc_ray.errors import AigcRayError

IGNORE = -100
ROLES = ("system", "user", "assistant")


class FormatError(AigcRayError, ValueError):
    """A chat example that cannot be rendered (bad roles, no assistant turn...)."""


def parse_messages(raw: str | list) -> list[dict]:
    """Validate a `messages` value (a JSON string or list) into [{role, content}]."""
    msgs = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(msgs, list) or not msgs:
        raise FormatError("messages must be a non-empty list")
    for i, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise FormatError(
                f"messages[{i}] must be {{role: system|user|assistant, content: str}}"
            )
    if not any(m["role"] == "assistant" for m in msgs):
        raise FormatError("messages has no assistant turn to learn from")
    return msgs


def default_pieces(msgs: list[dict], eos: str) -> list[tuple[str, bool]]:
    """(text, learn) pieces of the default template; learn=True marks assistant content."""
    pieces = []
    for m in msgs:
        pieces.append((f"<|{m['role']}|>\n", False))
        if m["role"] == "assistant":
            pieces.append((m["content"] + eos, True))
            pieces.append(("\n", False))
        else:
            pieces.append((m["content"] + "\n", False))
    return pieces


def template_pieces(msgs: list[dict], hf_tokenizer) -> list[tuple[str, bool]]:
    """(text, learn) pieces from the tokenizer's chat template, by rendering prefixes."""
    render = hf_tokenizer.apply_chat_template
    pieces, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            before = render(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
            through = render(msgs[: i + 1], tokenize=False)
            if not through.startswith(before) or not before.startswith(done):
                raise FormatError("chat template is not prefix-stable; cannot mask the prompt")
            pieces += [(before[len(done) :], False), (through[len(before) :], True)]
            done = through
    full = render(msgs, tokenize=False)
    if full.startswith(done) and len(full) > len(done):
        pieces.append((full[len(done) :], False))
    return pieces


def encode_pieces(pieces: list[tuple[str, bool]], encode) -> tuple[list[int], list[int]]:
    """Token ids and labels: each piece encoded separately, so label boundaries are exact."""
    ids, labels = [], []
    for text, learn in pieces:
        if not text:
            continue
        toks = encode(text)
        ids += toks
        labels += toks if learn else [IGNORE] * len(toks)
    return ids, labels
