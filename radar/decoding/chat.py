"""Chat prompts: a conversation rendered with the tokenizer's chat template, or the plain one-turn layout for
models that have none (the tiny test models).

Without a template, a conversation must be optional leading system messages, then user/assistant turns
alternating, starting and ending with a user turn. It renders as the system text and a blank line, then one
"Question: {user}\\nAnswer: {assistant}\\n" block per exchange, ending with "Question: {last user}\\nAnswer:".
"""

from __future__ import annotations

from typing import Sequence

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}


def render_chat(tokenizer, messages: str | Sequence[Message]) -> tuple[str, bool]:
    """The prompt text for `messages` (a string is one user turn), and whether the tokenizer should still add its
    special tokens (never a second BOS when the template already wrote one)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not messages or any(m["role"] == "user" and not m["content"].strip() for m in messages):
        raise ValueError("the prompt is empty")
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - templates raise jinja's own errors for a role order they refuse
            raise ValueError(f"the chat template refused these messages: {exc}") from None
        bos = tokenizer.bos_token
        return text, not (bos and text.startswith(bos))
    return _plain(messages), True


def _plain(messages: Sequence[Message]) -> str:
    n_sys = 0
    while n_sys < len(messages) and messages[n_sys]["role"] == "system":
        n_sys += 1
    system, turns = [m["content"] for m in messages[:n_sys]], messages[n_sys:]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or [m["role"] for m in turns] != expected or turns[-1]["role"] != "user":
        raise ValueError("this model has no chat template: messages must be optional system messages, then "
                         "user/assistant turns alternating, starting and ending with a user message")
    parts = ["\n".join(system) + "\n\n"] if system else []
    for i in range(0, len(turns), 2):
        parts.append(PLAIN_TEMPLATE.format(question=turns[i]["content"]))
        if i + 1 < len(turns):
            parts.append(f" {turns[i + 1]['content']}\n")
    return "".join(parts)
