"""Chat messages and tools to token ids, through the model's own chat template.

Owns how a conversation becomes tokens, so that matching can compare token ids: the whole
conversation is rendered every turn and compared with a session's history, never trusted to
"just be the same". Invariants:

- ``prompt(req)`` is exactly what a freshly started server computes for that request;
- an assistant message with tool calls renders as Hermes-style blocks, the very text the
  grammar in ``grammar.py`` makes the model produce (``TOOL_CALL_BEGIN`` ... ``TOOL_CALL_END``);
- templates without tool support get the generic fallback: the tools are described in the
  system prompt, tool results come back as a user turn of ``<tool_response>`` blocks;
- a model without any chat template is rendered as ChatML.
"""

from __future__ import annotations

import json

from djinn.server.http.errors import bad_request
from djinn.server.http.validate import ChatRequest

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def call_prefix(name: str) -> str:
    """The text of a tool call up to its arguments (the grammar's and the renderer's common form)."""
    return TOOL_CALL_OPEN + '\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


CALL_SUFFIX = "}\n" + TOOL_CALL_CLOSE
CALL_SEPARATOR = "\n"


def call_text(name: str, arguments: str) -> str:
    return call_prefix(name) + arguments + CALL_SUFFIX


def tools_prompt(tools: list[dict]) -> str:
    """The generic description of tools for templates that have no tool support of their own."""
    lines = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


class Renderer:
    """Renders one model's conversations. Stateless apart from the tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        self.template = template if isinstance(template, str) and template else CHATML
        self.native_tools = "tools" in self.template and "tool_call" in self.template
        self.eos_id = tokenizer.eos_token_id

    # ---- messages in the template's vocabulary -----------------------------------------
    def _messages(self, req: ChatRequest, extra: list[dict] = ()) -> list[dict]:
        msgs = list(req.messages) + list(extra)
        if self.native_tools:
            return [self._native(m) for m in msgs]
        out: list[dict] = []
        for m in msgs:
            if m["role"] == "assistant":
                calls = [call_text(c["name"], c["arguments"]) for c in m.get("tool_calls", ())]
                text = CALL_SEPARATOR.join(calls)
                content = m["content"] + ("\n" if m["content"] and text else "") + text
                out.append({"role": "assistant", "content": content})
            elif m["role"] == "tool":
                block = f"<tool_response>\n{m['content']}\n</tool_response>"
                if out and out[-1].get("_tool"):
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block, "_tool": True})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        for m in out:
            m.pop("_tool", None)
        if req.tools:
            described = tools_prompt(req.tools)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
            else:
                out.insert(0, {"role": "system", "content": described})
        return out

    @staticmethod
    def _native(m: dict) -> dict:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                try:
                    args = json.loads(c["arguments"])
                except ValueError:
                    args = c["arguments"]
                calls.append({"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": args}})
            return {"role": "assistant", "content": m["content"], "tool_calls": calls}
        return dict(m)

    def _render(self, req: ChatRequest, extra: list[dict], generation_prompt: bool) -> str:
        kwargs = {}
        if self.native_tools and req.tools:
            kwargs["tools"] = [{"type": "function", "function": t} for t in req.tools]
        try:
            return self.tokenizer.apply_chat_template(
                self._messages(req, extra), tokenize=False, add_generation_prompt=generation_prompt,
                chat_template=self.template, **kwargs)
        except Exception as exc:  # jinja raise_exception(...) and friends: the conversation breaks the template
            raise bad_request(f"the model's chat template rejected these messages: {exc}", param="messages") from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- what matching and generation use ----------------------------------------------
    def prompt(self, req: ChatRequest) -> list[int]:
        """Token ids of the whole conversation plus the generation prompt."""
        return self.encode(self._render(req, [], True))

    def with_reply(self, req: ChatRequest, reply: dict) -> list[int]:
        """Token ids the next request will start with once ``reply`` (an assistant message) joins the
        conversation: up to and including the reply's end-of-turn token when the template writes one."""
        ids = self.encode(self._render(req, [reply], False))
        if self.eos_id is not None and self.eos_id in ids:
            last = len(ids) - 1 - ids[::-1].index(self.eos_id)
            return ids[:last + 1]
        return ids

    def system_prefix(self, req: ChatRequest, prompt: list[int]) -> int:
        """Length of the shared system-and-tools prefix: a match must reach past it."""
        head = [m for m in req.messages[:1] if m["role"] == "system"]
        if not head and not req.tools:
            return 0
        probe = ChatRequest(model=req.model, messages=head, tools=req.tools)
        try:
            ids = self.encode(self._render(probe, [], False))
        except Exception:
            return 0
        n = 0
        for a, b in zip(ids, prompt):
            if a != b:
                break
            n += 1
        return n
