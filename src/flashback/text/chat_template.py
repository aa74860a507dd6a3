"""A conversation as token ids, through the tokenizer's chat template.

Message contents are tokenized as plain text, never as special tokens: the template is rendered around stand-ins,
its own text tokenized with its special tokens, each content with `encode`. A message cannot forge a turn or a
marker. The server's chat endpoint, `flashback chat`, the chat bench and the grounded QA evaluation all render here.
"""

from __future__ import annotations

import uuid

from flashback.errors import FlashbackError
from flashback.text.tokenize import encode


def render(tokenizer, messages: list[dict], query_tokens: int) -> tuple[list[int], str]:
    """(token ids of the conversation with the assistant's turn opened, the first retrieval's query: the last
    `query_tokens` tokens of the last user message, or of the last message when no user spoke)."""
    if not getattr(tokenizer, "chat_template", None):
        raise FlashbackError("this model's tokenizer has no chat template: use /v1/completions")
    nonce = uuid.uuid4().hex
    stand_ins = [f"\ue000{nonce}{i}\ue001" for i in range(len(messages))]
    try:
        text = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": s} for m, s in zip(messages, stand_ins, strict=True)],
            add_generation_prompt=True,
            tokenize=False,
        )
    except Exception as exc:  # templates raise their own errors (roles out of order, a missing user turn)
        raise FlashbackError(f"the chat template refused the messages: {exc}") from None
    ids, rest, contents = [], text, []
    for message, stand_in in zip(messages, stand_ins, strict=True):
        before, found, rest = rest.partition(stand_in)
        if not found:
            raise FlashbackError(f"this model's chat template does not keep {message['role']} messages")
        content = encode(tokenizer, message["content"])
        ids += _template_ids(tokenizer, before) + content
        contents.append(content)
    ids += _template_ids(tokenizer, rest)
    asked = [c for m, c in zip(messages, contents, strict=True) if m["role"] == "user"] or contents
    return ids, tokenizer.decode(asked[-1][-query_tokens:])


def _template_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
