"""Named settings of ``djinn bench agents``: ``seeds``, ``tools`` and the ``--quick`` smoke runs.

Every field can be overridden on the command line; the resolved values go into the JSON.

- ``seeds``: the seed documents' density experiment, measured properly: a Llama-2-7B shape,
  1,024-token context prompts, Poisson arrivals at 0.2/s, tools uniform 10-20 s; N sweeps
  8..80 and keeps growing (x1.25) until the policy fails or ``max_n``. The default device
  budget (20 GiB: 12.6 GiB of weights, ~5.8 GiB of KV, ~9 agents at full length) is chosen so
  that keeping every agent resident runs out; host memory is generous. ``time_scale`` 0.25
  compresses arrival gaps and tool times by 4 (stated in the JSON with the resulting ratio of
  tool time to compute time) so a policy's sweep fits in one 10-minute command.
- ``dense``: the ``seeds`` shapes and budgets with agents that overlap, so that N is the
  number of agents live at once rather than the length of the run. At 0.2/s and 4 turns the
  live count stays near 15 whatever N is (an agent lives ~4 tool times), so no policy's cliff
  shows; here 10 turns each and arrivals at 0.5/s (5/s as run, x0.1) keep up to ~90 live. Full
  contexts reach ~1.8K tokens (0.9 GiB), so beyond ~60 live agents the 48 GiB host tier fills
  as well and policies must also choose what to drop.
- ``tools``: tool times 0.1, 1, 10 and 30 s (one sub-sweep each) with contexts growing over 8
  turns, so keeping (short tools), parking (long tools, host room) and dropping each have a
  regime where they win; N in {4, 8} at a budget where 4 agents fit and 8 do not. Tool times
  and arrival gaps run compressed x0.25 (0.025, 0.25, 2.5 and 7.5 s as run; stated in the JSON
  as ``time_scale`` and ``tool_classes_as_run_s``): on an H100 (~55 GB/s each way) parking plus
  restoring a session of up to ~3K tokens (1.5 GiB) takes ~0.06 s, so ``semantic`` keeps the
  0.1 s class on the device and parks the others (the choice figure). Host memory 16 GiB holds
  all 8 agents' KV (~12 GiB) and pins in ~10 s; one policy per command fits in 9 minutes
  (~5 minutes expected: load + pinning ~1.5, runs ~3.5).
- ``--api openai --quick``: the quick presets on SmolLM2-135M (``OPENAI_QUICK``), since the
  chat-rendered conversation does not fit tiny-llama's context.
- ``shared-prefix``: agents whose first prompt starts with the same 2,000-token system prompt and
  tool list (``shared_prefix_tokens``; then 64 tokens of their own), run with automatic prefix
  sharing on and off (``prefix_sharing``) under the same budgets (the ``seeds`` preset's 20 GiB
  device, where about 5 agents' unshared 2k-token contexts fit; 16 GiB host): the agents
  sustained each way. Arrivals at 0.5/s (2/s as run): a block becomes shareable when the turn
  that computes it ends, so agents arriving during the first one's prefill compute their own
  (the first H100 run at 8/s as run had every agent of N=8 prefilling at once). Semantic policy only; ``--quick`` gives its CPU smoke run (``shared-prefix-quick``).
- ``quick``: tiny-llama on the CPU with a 20-block device KV pool (2-3 agents' worth) that
  forces parking at N=8, N in {2, 4, 8}: the CI smoke run (well under 3 minutes on 2 cores).
- ``tools-quick``: the tools preset's smoke run: tiny-llama on the CPU, a 0.01 s tool (far
  below the ~0.05 s break-even of these tiny sessions: kept) and a 0.3 s one (parked), N=2
  (fits the 20-block pool) and N=4 (does not: pressure parks short waits too).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class AgentsPreset:
    name: str
    model: str
    device: str = "auto"
    dtype: str = "auto"
    prompt_tokens: int = 1024
    context_tokens: int = 64
    new_tokens: int = 16
    turns: int = 4
    rate: float = 0.2
    tools: tuple[str, ...] = ("uniform:10,20",)
    n: tuple[int, ...] = (8, 16, 32, 48, 64, 80)
    until_fail: bool = True
    max_n: int = 160
    time_scale: float = 1.0
    gpu_memory: str | None = None
    host_memory: str | None = None
    kv_blocks: int | None = None
    block_size: int = 16
    policies: tuple[str, ...] = ("semantic", "lru", "recompute", "resident")
    # wall-clock bound of one policy's sweep (model load included): one policy per 10-minute command,
    # with room for the grace given to turns in flight when the bound hits
    policy_budget_s: float = 420.0
    slo_ms: float = 2000.0               # p99 turn latency a "sustained" run stays under
    shared_prefix_tokens: int = 0        # tokens every agent's first prompt starts with (the same for all)
    prefix_sharing: tuple[bool, ...] = (True,)   # sweep each policy with automatic prefix sharing on / off
    notes: tuple[str, ...] = field(default_factory=tuple)


PRESETS: dict[str, AgentsPreset] = {
    "seeds": AgentsPreset(
        name="seeds", model="llama2-7b", prompt_tokens=1024, context_tokens=64, new_tokens=16, turns=4, rate=0.2,
        tools=("uniform:10,20",), n=(8, 16, 32, 48, 64, 80), until_fail=True, max_n=160, time_scale=0.25,
        gpu_memory="20GiB", host_memory="48GiB",
        notes=("arrival gaps and tool times x time_scale; compute is not scaled",)),
    "dense": AgentsPreset(
        name="dense", model="llama2-7b", prompt_tokens=1024, context_tokens=64, new_tokens=16, turns=10, rate=0.5,
        tools=("uniform:10,20",), n=(32, 64, 96, 128), until_fail=True, max_n=200, time_scale=0.1,
        gpu_memory="20GiB", host_memory="48GiB",
        notes=("the seeds shapes with agents that overlap: 10 turns each and arrivals at 0.5/s, so the number of "
               "live agents grows with N (at 0.2/s and 4 turns it stays near 15 whatever N is)",
               "arrival gaps and tool times x time_scale; compute is not scaled",)),
    "tools": AgentsPreset(
        name="tools", model="llama2-7b", prompt_tokens=256, context_tokens=384, new_tokens=16, turns=8, rate=1.0,
        tools=("fixed:0.1", "fixed:1", "fixed:10", "fixed:30"), n=(4, 8), until_fail=False, time_scale=0.25,
        gpu_memory="24GiB", host_memory="16GiB", policy_budget_s=360.0,
        notes=("one sub-sweep per tool time; arrival gaps and tool times x time_scale",
               "run one policy per command (--policies P): each fits in 9 minutes")),
    "shared-prefix": AgentsPreset(
        name="shared-prefix", model="llama2-7b", shared_prefix_tokens=2000, prompt_tokens=64, context_tokens=64,
        new_tokens=16, turns=3, rate=0.5, tools=("uniform:2,6",), n=(8, 16, 32, 48, 64), until_fail=True,
        max_n=128, time_scale=0.25, gpu_memory="20GiB", host_memory="16GiB", policies=("semantic",),
        prefix_sharing=(True, False), policy_budget_s=150.0,
        notes=("every agent's first prompt: the same 2,000 tokens, then 64 of its own; "
               "arrival gaps and tool times x time_scale",)),
    "shared-prefix-quick": AgentsPreset(
        name="shared-prefix-quick", model="tiny-llama", device="cpu", shared_prefix_tokens=128, prompt_tokens=16,
        context_tokens=16, new_tokens=6, turns=3, rate=20.0, tools=("uniform:0.05,0.15",), n=(4, 8, 16),
        until_fail=False, kv_blocks=40, host_memory="8MiB", policies=("semantic",), prefix_sharing=(True, False),
        policy_budget_s=40.0, notes=("CPU smoke run of the shared-prefix preset",)),
    "quick": AgentsPreset(
        name="quick", model="tiny-llama", device="cpu", prompt_tokens=48, context_tokens=16, new_tokens=6, turns=3,
        rate=20.0, tools=("uniform:0.05,0.15",), n=(2, 4, 8), until_fail=False, kv_blocks=20, host_memory="8MiB",
        policy_budget_s=40.0, notes=("CPU smoke run: tiny model, tiny device KV pool",)),
    "tools-quick": AgentsPreset(
        name="tools-quick", model="tiny-llama", device="cpu", prompt_tokens=32, context_tokens=16, new_tokens=4,
        turns=4, rate=20.0, tools=("fixed:0.01", "fixed:0.3"), n=(2, 4), until_fail=False, kv_blocks=20,
        host_memory="8MiB", policy_budget_s=30.0, notes=("CPU smoke run of the tools preset",)),
}


# ``--api openai --quick``: tiny-llama's tokenizer spends about a token per character, so a
# chat-rendered conversation overruns its 512-token context; SmolLM2-135M (a chat template,
# 8k context) instead, with a device pool of ~2.5 agents' full conversations (N=4 must park or
# drop) and host room for ~3.
OPENAI_QUICK = {"model": "smollm2-135m", "n": (2, 4), "kv_blocks": 64, "host_memory": "64MiB",
                "policy_budget_s": 240.0, "notes": ("CPU smoke run over the OpenAI API: SmolLM2-135M, small KV pool",)}


def resolve(name: str, quick: bool, overrides: dict, api: str = "native") -> AgentsPreset:
    """The preset ``name`` (its quick variant with ``quick``), with non-None overrides applied."""
    if quick:
        name = {"tools": "tools-quick", "shared-prefix": "shared-prefix-quick"}.get(name, "quick")
    preset = PRESETS[name]
    if quick and api == "openai":
        preset = replace(preset, **OPENAI_QUICK)
    fields = {k: v for k, v in overrides.items() if v is not None and hasattr(preset, k)}
    for k in ("tools", "n", "policies", "prefix_sharing"):
        if k in fields:
            fields[k] = tuple(fields[k])
    return replace(preset, **fields)
