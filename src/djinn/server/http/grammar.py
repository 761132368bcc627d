"""Grammar-constrained decoding of tool calls (``tool_choice`` required or named), with xgrammar.

Owns the grammars and the per-request logits processor the engine applies before sampling
(``GenerateRequest.logits_processor``). A named choice allows exactly one call of that tool; a
required one allows one call of any offered tool, or up to ``MAX_PARALLEL`` separated by a
newline when parallel calls are on. Arguments must match each tool's JSON schema and are
written compactly (``any_whitespace=False``), the form ``render.call_text`` renders them back in.

Where the grammar leaves only one way to continue (the fixed ``<tool_call>\\n{"name": ...``
text), the processor forces that text's canonical tokenization, so the tokens the model writes
are the ones a tokenizer gives for the same text and the next turn's re-rendered prompt matches
the session's history token for token.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Callable

import torch

from djinn.server.http.render import CALL_SEPARATOR, CALL_SUFFIX, call_prefix

MAX_PARALLEL = 4


def _const(text: str):
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf("root ::= " + json.dumps(text, ensure_ascii=False))


def _only(logits: torch.Tensor, token: int) -> torch.Tensor:
    """Logits that allow ``token`` alone (it must be allowed already)."""
    if logits[0, token] == float("-inf"):
        return logits
    keep = logits[0, token].clone()
    logits.fill_(float("-inf"))
    logits[0, token] = keep
    return logits


class ToolGrammars:
    """Compiles (and caches) tool-call grammars for one tokenizer."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr

        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = set(stop_ids)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, object] = OrderedDict()

    def _call(self, tool: dict):
        import xgrammar as xgr

        return xgr.Grammar.concat(_const(call_prefix(tool["name"])),
                                  xgr.Grammar.from_json_schema(tool["parameters"], any_whitespace=False),
                                  _const(CALL_SUFFIX))

    def _grammar(self, tools: list[dict], choice: str | dict, parallel: bool):
        import xgrammar as xgr

        if isinstance(choice, dict):
            return self._call(next(t for t in tools if t["name"] == choice["name"]))
        one = xgr.Grammar.union(*[self._call(t) for t in tools]) if len(tools) > 1 else self._call(tools[0])
        if not parallel:
            return one
        options = [one]
        for n in range(2, MAX_PARALLEL + 1):
            parts = [one]
            for _ in range(n - 1):
                parts += [_const(CALL_SEPARATOR), one]
            options.append(xgr.Grammar.concat(*parts))
        return xgr.Grammar.union(*options)

    def compiled(self, tools: list[dict], choice: str | dict, parallel: bool):
        key = json.dumps([tools, choice, parallel], sort_keys=True)
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                try:
                    hit = self.compiler.compile_grammar(self._grammar(tools, choice, parallel))
                except Exception as exc:
                    from djinn.server.http.errors import bad_request

                    raise bad_request(f"cannot build a grammar for these tools' parameter schemas: {exc}",
                                      param="tools") from None
                self._cache[key] = hit
                while len(self._cache) > 64:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            return hit

    def processor(self, tools: list[dict], choice: str | dict, parallel: bool
                  ) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
        """A fresh logits processor for one turn (it holds the turn's grammar state)."""
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self.compiled(tools, choice, parallel))
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        accepted = [0]

        def process(out: list[int], logits: torch.Tensor) -> torch.Tensor:
            for tok in out[accepted[0]:]:
                if not matcher.accept_token(tok):      # cannot happen while every step is masked
                    raise RuntimeError(f"token {tok} broke the tool-call grammar")
                accepted[0] += 1
            matcher.fill_next_token_bitmask(bitmask)
            logits = logits.float()
            width = logits.shape[-1]
            if width > self.vocab_size:        # padded LM head: ids past the tokenizer never come out
                logits[..., self.vocab_size:] = float("-inf")
                head = logits[..., :self.vocab_size].contiguous()
                xgr.apply_token_bitmask_inplace(head, bitmask.to(logits.device))
                logits[..., :self.vocab_size] = head
            else:
                xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
            forced = matcher.find_jump_forward_string()
            if forced:
                ids = self.tokenizer.encode(forced, add_special_tokens=False)
                # the last piece may merge with what follows the fixed text: leave it to the model
                if len(ids) >= 2:
                    return _only(logits, ids[0])
                return logits
            # the model's favourite may swallow the start of fixed text that follows it (`"}` then `}`
            # where a tokenizer writes `"` then `}}`): then prefer the tokenizer's own split
            best = int(logits.argmax(-1)[0])
            text = self.tokenizer.decode([best])
            if best in self.stop_ids or "\ufffd" in text or not matcher.accept_token(best):
                return logits
            after = matcher.find_jump_forward_string()
            matcher.rollback(1)
            if after:
                ids = self.tokenizer.encode(text + after, add_special_tokens=False)
                if ids and ids[0] != best and 0 < len(self.tokenizer.decode([ids[0]])) < len(text):
                    return _only(logits, ids[0])
            return logits

        return process
