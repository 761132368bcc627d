"""The model's output text to OpenAI ``content`` + ``tool_calls``, whole or while it streams.

Understands Hermes-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks and a
reply that is nothing but a bare JSON call (``{"name", "arguments"|"parameters"}`` or a list of
them). A call naming a tool that was not offered stays text. Arguments come back as compact JSON
(``json.dumps`` defaults), the form the grammar makes the model write.

Invariant for streaming: ``Splitter`` only ever emits a prefix of the ``content`` that ``parse``
returns for the finished text, so streamed and non-streamed replies agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from djinn.server.http.render import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str          # a JSON object, as a string


def _call(obj, names: set[str]) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _bare(text: str, names: set[str]) -> list[tuple[str, str]] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_call(o, names) for o in objs]
    return calls if calls and all(calls) else None


def parse(text: str, tool_names: set[str], choice: str | dict,
          truncated: bool = False) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) of a finished reply. ``truncated``: generation stopped at
    ``max_tokens``, so a call still open at the end (its ``<tool_call>`` block unclosed, a bare
    JSON call unfinished, or the tag itself cut) is a call cut short: it is left out of both
    the calls and the content, as OpenAI leaves a cut call's text out of ``content``."""
    if choice == "none" or not tool_names:
        return text, []
    stripped = text.strip()
    bare = _bare(stripped, tool_names) if stripped[:1] in "{[" else None
    if bare:
        return None, bare
    if truncated and stripped[:1] in "{[":
        return None, []                # a bare JSON call cut short: no text of it is content
    if truncated:
        text = _without_cut_tag(text)
    outside, calls, pos = [], [], 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start < 0:
            outside.append(text[pos:])
            break
        end = text.find(TOOL_CALL_CLOSE, start)
        if end < 0 and truncated:      # the call max_tokens cut: only the text before it is content
            outside.append(text[pos:start])
            break
        inner = text[start + len(TOOL_CALL_OPEN): end if end >= 0 else len(text)]
        try:
            call = _call(json.loads(inner), tool_names)
        except ValueError:
            call = None
        if call is None:           # not a call we can honour: it stays text, as written
            outside.append(text[pos: end + len(TOOL_CALL_CLOSE) if end >= 0 else len(text)])
        else:
            outside.append(text[pos:start])
            calls.append(call)
        if end < 0:
            break
        pos = end + len(TOOL_CALL_CLOSE)
    content = "".join(outside).strip() if calls or truncated else text.strip()
    return (content or None), calls


def _without_cut_tag(text: str) -> str:
    """``text`` less a tail that is the start of ``<tool_call>`` (the tag itself cut short)."""
    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-k:]):
            return text[:-k]
    return text


class Splitter:
    """Decides how much of a growing reply can be streamed as content now."""

    def __init__(self, tool_names: set[str], choice: str | dict, stop: list[str]):
        self.parse_tools = choice != "none" and bool(tool_names)
        self.forced = self.parse_tools and choice != "auto"     # required / named: the reply is calls
        self.stop = [s for s in stop if s]
        self.emitted = ""

    def before_stop(self, text: str) -> str:
        """``text`` without what a stop string ends or may still end: cut at the first stop string
        (as the engine cuts the reply: the token that completes one is streamed, and may carry
        more text), else without its longest tail that begins a stop string."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[:min(hits)]
        for start in range(max(0, len(text) - max((len(s) for s in self.stop), default=0) + 1), len(text)):
            tail = text[start:]
            if any(s.startswith(tail) for s in self.stop):
                return text[:start]
        return text

    def safe(self, text: str) -> str:
        """The new content that can be sent for ``text`` (all output so far)."""
        if text.endswith("\ufffd"):
            text = text[:-1]                  # an incomplete UTF-8 sequence
        text = self.before_stop(text)
        if self.parse_tools:
            if self.forced:
                return ""
            text = text.lstrip()
            if text[:1] in ("{", "["):
                return ""                     # may be a bare JSON call: wait for the end
            cut = text.find(TOOL_CALL_OPEN)
            if cut >= 0:
                text = text[:cut]
            else:
                for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
                    if TOOL_CALL_OPEN.startswith(text[-k:]):
                        text = text[:-k]
                        break
            text = text.rstrip()
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        new = text[len(self.emitted):]
        self.emitted = text
        return new

    def rest(self, content: str | None) -> str:
        """What remains to send once the reply is finished and ``content`` is final."""
        content = content or ""
        if content.startswith(self.emitted):
            new = content[len(self.emitted):]
            self.emitted = content
            return new
        return ""
