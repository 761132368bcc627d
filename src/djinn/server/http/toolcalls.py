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


def parse(text: str, tool_names: set[str], choice: str | dict) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) of a finished reply."""
    if choice == "none" or not tool_names:
        return text, []
    stripped = text.strip()
    bare = _bare(stripped, tool_names) if stripped[:1] in "{[" else None
    if bare:
        return None, bare
    outside, calls, pos = [], [], 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start < 0:
            outside.append(text[pos:])
            break
        end = text.find(TOOL_CALL_CLOSE, start)
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
    content = "".join(outside).strip() if calls else text.strip()
    return (content or None), calls


class Splitter:
    """Decides how much of a growing reply can be streamed as content now."""

    def __init__(self, tool_names: set[str], choice: str | dict, stop: list[str]):
        self.parse_tools = choice != "none" and bool(tool_names)
        self.forced = self.parse_tools and choice != "auto"     # required / named: the reply is calls
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming
        self.emitted = ""

    def safe(self, text: str) -> str:
        """The new content that can be sent for ``text`` (all output so far)."""
        if text.endswith("\ufffd"):
            text = text[:-1]                  # an incomplete UTF-8 sequence
        if self.hold:
            text = text[:max(0, len(text) - self.hold)]
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
