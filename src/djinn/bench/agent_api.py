"""``djinn bench agents --api openai``: the agent workload through the OpenAI-compatible API,
driven by the unmodified ``openai.AsyncOpenAI`` client against a real HTTP server process.

Owns the server process of one policy (``python -m djinn.server.http`` on a free loopback port,
the same model and budgets as the native run), the stats read from its ``GET /metrics``, the
word rendering of the plan, and the asyncio agents. The plan is the native one
(``workload.build``) with a vocabulary of ``len(WORDS)`` ids, each id one word, so arrivals,
tool times and the number of words per prompt are the native run's for the same seed.

An agent's turn is one ``chat.completions.create`` whose messages are the whole conversation so
far, as an unmodified client sends it: turn 1 is a system message (``prompt_tokens`` words)
and a user message; every turn offers one tool and names it in ``tool_choice``, so the reply
ends in a tool call (finish_reason ``tool_calls``) -- which by itself parks the session in
IO_WAIT on the server. The agent then "runs the tool" (sleeps its tool time) and sends the next
request with the assistant's tool call and a ``tool`` message of ``context_tokens`` words. Nobody
calls ``signal_phase``: the server infers the phases, which is what this mode measures. After
its last turn an agent deletes its session (``DELETE /v1/sessions/{id}``), as the native agents
close theirs.

Per turn, the record is the native ``TurnRecord``: latency is the client's wall time of the
request; queue/restore/compute and TTFT (queue + restore + prefill) come from the response's
``djinn.timings``; ``cached_tokens`` from ``usage.prompt_tokens_details``; ``history_tokens``
is the previous request's prompt + completion tokens (the session's KV then), and
``prompt_tokens`` the tokens this request added on top of it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from djinn.bench.agent_runner import RunOptions, _Progress, finish_run
from djinn.bench.metrics import MemorySampler, TurnRecord
from djinn.bench.workload import AgentPlan

API_KEY = "djinn-bench-agents"
TOOL = {"type": "function", "function": {
    "name": "run_tool", "description": "Run the agent's tool and return its output.",
    "parameters": {"type": "object", "properties": {}}}}
TOOL_CHOICE = {"type": "function", "function": {"name": "run_tool"}}
# max_tokens of a turn: a forced call of run_tool is ~26 tokens; room so it never ends at "length"
CALL_TOKENS = 64

# common English words: with a leading space each is one token in the usual BPE vocabularies,
# so N words grow a conversation by about N tokens
WORDS = tuple("""time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number night point
home water room mother area money story fact month lot right study book eye job word business issue side kind
head house service friend father power hour game line end member law car city community name president team
minute idea kid body information back parent face others level office door health person art war history party
result change morning reason research girl guy moment air teacher force education foot boy age policy process
music market sense nation plan college interest death experience effect use class control care field development
role effort rate heart drug show leader light voice wife police mind price report decision son view relationship
town road arm difference value building action model season society tax director position player record paper
space ground form event official matter center couple site project activity star table need court oil situation
cost industry figure street image phone data picture practice piece land product doctor wall patient worker news
test movie north love support technology step baby computer type attention film tree source organization hair
window evidence population""".split())


def words(ids: list[int]) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in ids)


class HttpServer:
    """One ``python -m djinn.server.http`` process on a free loopback port; ``stop()`` ends it."""

    def __init__(self, args: list[str], timeout_s: float = 600.0, token: str | None = API_KEY,
                 env: dict | None = None):
        # the child inherits this environment (PYTHONPATH, OMP_NUM_THREADS) and so runs this djinn;
        # ``token=None``: the caller's ``args`` name the server's tokens
        tokens = ["--token", token] if token else []
        self.proc = subprocess.Popen([sys.executable, "-m", "djinn.server.http", "--port", "0", *tokens, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env if env is not None else dict(os.environ))
        self.lines: list[str] = []
        self.url: str | None = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("djinn-http listening on "):
                self.url = line.split()[-1]
                break
        if self.url is None:
            self.stop()
            raise RuntimeError("the HTTP server did not start:\n" + "".join(self.lines[-30:]))
        # keep draining its output so a chatty server never blocks on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            del self.lines[:-200]

    @property
    def root(self) -> str:
        return self.url[: -len("/v1")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_SAMPLE = re.compile(r'^(djinn_[a-z_]+?)(?:_total)?(?:\{([^}]*)\})?\s+(\S+)$')


def parse_metrics(text: str) -> dict[str, Any]:
    """``GET /metrics`` text as a dict shaped like ``client.stats()`` (the keys metrics.STAT_PATHS reads)."""
    mem: dict[str, Any] = {}
    out: dict[str, Any] = {"memory": mem, "bytes_moved": {}, "swaps": {}, "sessions_by_phase": {}}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")), float(m.group(3))
        if name == "djinn_kv_bytes":
            mem["kv_" + labels.get("tier", "")] = int(value)
        elif name == "djinn_kv_capacity_bytes":
            mem[f"kv_{labels.get('tier', '')}_capacity"] = int(value)
        elif name == "djinn_weights_bytes":
            mem["weights"] = int(value)
        elif name == "djinn_bytes_moved":
            out["bytes_moved"][labels.get("direction", "all")] = int(value)
        elif name == "djinn_swaps":
            out["swaps"][labels.get("direction", "all")] = int(value)
        elif name == "djinn_sessions":
            out["sessions_by_phase"][labels.get("phase", "")] = int(value)
        elif name in ("djinn_turns", "djinn_tokens_generated", "djinn_tokens_computed"):
            out[name[len("djinn_"):]] = int(value)
    out["sessions"] = sum(out["sessions_by_phase"].values())
    return out


@dataclass
class ApiStats:
    """``stats()`` over HTTP, so ``MemorySampler`` and the native summary read the server alike."""

    server: HttpServer

    def stats(self) -> dict[str, Any]:
        r = httpx.get(self.server.root + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        r.raise_for_status()
        return parse_metrics(r.text)


def server_args(cfg, policy: str, prefix_sharing: bool = True) -> list[str]:
    """The launcher's arguments for ``cfg`` (an AgentsPreset) and one policy."""
    args = ["--model", cfg.model, "--device", cfg.device, "--dtype", cfg.dtype, "--policy", policy]
    if not prefix_sharing:
        args.append("--no-prefix-sharing")
    for flag, value in (("--gpu-memory", cfg.gpu_memory), ("--host-memory", cfg.host_memory),
                        ("--kv-blocks", cfg.kv_blocks)):
        if value is not None:
            args += [flag, str(value)]
    return args


async def _turn(client, model: str, messages: list[dict]):
    return await client.chat.completions.create(model=model, messages=messages, tools=[TOOL], tool_choice=TOOL_CHOICE,
                                                max_tokens=CALL_TOKENS, temperature=0)


def _record(plan: AgentPlan, k: int, start_s: float, wall_ms: float, resp, history: int, tool_s: float) -> TurnRecord:
    info = (resp.model_extra or {}).get("djinn") or {}
    t = info.get("timings") or {}
    ttft = t.get("ttft_ms")
    if ttft is None and "prefill_ms" in t:
        ttft = t.get("queue_ms", 0.0) + t.get("restore_ms", 0.0) + t["prefill_ms"]
    u = resp.usage
    details = getattr(u, "prompt_tokens_details", None)
    return TurnRecord(agent=plan.index, turn=k, ok=True, start_s=start_s, latency_ms=wall_ms, ttft_ms=ttft,
                      queue_ms=t.get("queue_ms"), restore_ms=t.get("restore_ms"), compute_ms=t.get("compute_ms"),
                      prompt_tokens=u.prompt_tokens - history, new_tokens=u.completion_tokens,
                      cached_tokens=getattr(details, "cached_tokens", None),
                      computed_tokens=info.get("computed_tokens"), history_tokens=history, tool_s=tool_s)


async def _agent(client, http: httpx.AsyncClient, model: str, plan: AgentPlan, opts: RunOptions, t0: float,
                 out: list[TurnRecord], spans: list, bar: _Progress) -> None:
    def now() -> float:
        return time.perf_counter() - t0

    await asyncio.sleep(max(0.0, plan.arrival_s - now()))
    started, history, k, sid = now(), 0, 0, None
    messages = [{"role": "system", "content": words(plan.prompts[0])},
                {"role": "user", "content": "Call run_tool, then continue with its output."}]
    try:
        for k in range(len(plan.prompts)):
            tool = plan.tool_s[k - 1] if k > 0 else 0.0
            if k > 0:
                await asyncio.sleep(tool)      # the tool runs; the server parked the session on its own
                messages.append({"role": "tool", "tool_call_id": call_id, "content": words(plan.prompts[k])})
            if now() > opts.deadline_s:
                break
            t = time.perf_counter()
            resp = await _turn(client, model, messages)
            wall = (time.perf_counter() - t) * 1e3
            sid = ((resp.model_extra or {}).get("djinn") or {}).get("session_id", sid)
            choice = resp.choices[0]
            if choice.finish_reason != "tool_calls" or not choice.message.tool_calls:
                raise RuntimeError(f"the reply did not end in a tool call (finish_reason {choice.finish_reason!r})")
            out.append(_record(plan, k, t - t0, wall, resp, history, tool))
            bar.update(True)
            history = resp.usage.prompt_tokens + resp.usage.completion_tokens
            call_id = choice.message.tool_calls[0].id
            messages.append(choice.message.model_dump(exclude_none=True, exclude_unset=True))
        else:
            k = len(plan.prompts)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a failed turn is data, not a crash
        # an HTTP error keeps the engine's code: a 429 is "RateLimitError:<code>" (capacity or a full queue)
        code = getattr(exc, "code", None)
        name = type(exc).__name__ + (f":{code}" if isinstance(code, str) and code else "")
        out.append(TurnRecord(plan.index, k, False, name, start_s=now(), history_tokens=history))
        bar.update(False)
        k += 1
        out.extend(TurnRecord(plan.index, j, False, "abandoned") for j in range(k, len(plan.prompts)))
        k = len(plan.prompts)
    finally:
        if sid is not None:
            try:
                await http.delete(f"/v1/sessions/{sid}")
            except Exception:  # the server may be gone; the records stand
                pass
        spans.append((started, now()))
    out.extend(TurnRecord(plan.index, j, False, "not_run") for j in range(k, len(plan.prompts)))


def _client(server: HttpServer):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=600.0)


async def _run(server: HttpServer, model: str, plans: list[AgentPlan], opts: RunOptions, bar: _Progress):
    records: list[TurnRecord] = []
    spans: list[tuple[float, float]] = []
    async with _client(server) as client, httpx.AsyncClient(
            base_url=server.root, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        t0 = time.perf_counter()
        tasks = {p.index: asyncio.create_task(_agent(client, http, model, p, opts, t0, records, spans, bar))
                 for p in plans}
        # past the deadline no new turn starts; one in flight gets the native runner's grace
        grace = max(30.0, min(opts.deadline_s, 120.0))
        _, pending = await asyncio.wait(tasks.values(), timeout=opts.deadline_s + grace)
        cut_short = bool(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        hung = [i for i, task in tasks.items() if task in pending]
        wall = max((e for _, e in spans), default=time.perf_counter() - t0)
    return records, spans, hung, wall, cut_short


def run_agents_api(server: HttpServer, model: str, plans: list[AgentPlan], opts: RunOptions) -> dict[str, Any]:
    """Run every agent of ``plans`` concurrently through the API; the native run's summary keys."""
    stats = ApiStats(server)
    before = stats.stats()
    sampler = MemorySampler(stats, opts.sample_s).start()
    bar = _Progress(sum(len(p.prompts) for p in plans), opts.label, opts.progress)
    try:
        records, spans, hung, wall, cut_short = asyncio.run(_run(server, model, plans, opts, bar))
    finally:
        timeline = sampler.stop()
        bar.close()
    after = stats.stats()
    return finish_run(plans, records, spans, hung, wall, cut_short, before, after, sampler, timeline, opts)


def warmup_api(server: HttpServer, model: str, plan: AgentPlan) -> float:
    """Two turns of one agent (kernels, the tool grammar's first compile); a turn's compute seconds."""
    opts = RunOptions(new_tokens=1, deadline_s=1e9, slo_ms=1e9, progress=False)
    plan = AgentPlan(index=plan.index, arrival_s=0.0, prompts=plan.prompts[:2], tool_s=[0.0] * len(plan.tool_s[:1]))
    records, *_ = asyncio.run(_run(server, model, [plan], opts, _Progress(0, "", False)))
    bad = [r for r in records if not r.ok]
    if bad:
        raise RuntimeError(f"warm-up turn failed: {bad[0].error}")
    last = max(records, key=lambda r: r.turn)
    return (last.latency_ms or 0.0) / 1e3
