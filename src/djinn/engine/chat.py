"""Chat templates for multi-turn sessions that continue from server-resident state.

A chat template renders a whole conversation; a session must append only what a new user
turn adds. ``turn_text`` renders the conversation with a sentinel in place of the last
assistant reply and keeps what follows the sentinel: the end of the previous turn plus the
new user turn and the generation prompt, exactly as the template would render them.
"""

from __future__ import annotations

from djinn.errors import InvalidRequest

_SENTINEL = "\x00DJINN_PREVIOUS_REPLY\x00"


def turn_text(tokenizer, messages: list[dict], new: list[dict], ended_with_eos: bool) -> str:
    """Text to append to a session whose history is ``messages`` for the new ``new`` messages."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequest("this model has no chat template: pass chat=False (raw text) or token ids")
    if not messages:
        return tokenizer.apply_chat_template(new, tokenize=False, add_generation_prompt=True)
    if messages[-1]["role"] != "assistant":
        raise InvalidRequest("a chat session can only continue after an assistant turn")
    probe = messages[:-1] + [{"role": "assistant", "content": _SENTINEL}] + new
    text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    if _SENTINEL not in text:
        raise InvalidRequest("the chat template drops earlier assistant turns; use raw text or token ids")
    tail = text.split(_SENTINEL, 1)[1]
    eos = tokenizer.eos_token
    if ended_with_eos and eos and tail.startswith(eos):
        tail = tail[len(eos):]   # the model already produced the end-of-turn token
    return tail
