"""``djinn bench agents``: agent density. N agents arrive (Poisson, rate lambda) and run K turns
of generate -> tool call (IO_WAIT for a drawn tool time, then ACTIVE) -> generate with the
tool's output appended. One run sweeps N for every policy under the same budgets and seed.

Embedded (default): each policy gets a fresh engine, ``djinn.connect(policy=...)``, with the
same ``--gpu-memory``/``--host-memory``/``--kv-blocks``. Remote: ``--address host:port``
measures a running ``djinn serve``; a server has one policy, so start it with ``--policy P``
and pass the same single ``--policies P`` here (the name only labels the JSON), once per policy.

Presets (``djinn.bench.agent_presets``): ``--preset seeds``, ``--preset tools``,
``--preset shared-prefix`` (a common 2,000-token system prompt, prefix sharing on vs off), ``--quick``.
With ``--prefix-sharing on off`` every policy runs twice, labelled ``POLICY sharing on|off``.
Per (policy, tool time, N) the JSON has: success rate, p50/p99/max of turn latency and TTFT,
queue/restore/compute split, turns/min and tokens/s, peak device memory, bytes moved, the
share of returning turns served without recompute, every turn, and a memory timeline.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from dataclasses import asdict
from typing import Any

import torch

import djinn
from djinn.bench.agent_presets import PRESETS, AgentsPreset, resolve
from djinn.bench.agent_runner import RunOptions, run_agents
from djinn.bench.common import record, write
from djinn.bench.metrics import wait_choices, wait_host_ready
from djinn.bench.workload import ToolTime, WorkloadSpec, build


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn bench agents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seeds", choices=[k for k in PRESETS if "quick" not in k])
    p.add_argument("--quick", action="store_true", help="tiny-llama on the CPU, small KV pool: a smoke run")
    p.add_argument("--policies", nargs="+", default=None, help="policies to compare (default: all four)")
    p.add_argument("--n", nargs="+", type=int, default=None, help="agent counts to sweep")
    p.add_argument("--until-fail", dest="until_fail", action="store_true", default=None,
                   help="after the listed N, keep growing N (x1.25) until the policy fails or --max-n")
    p.add_argument("--no-until-fail", dest="until_fail", action="store_false")
    p.add_argument("--max-n", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="arrivals per second (<= 0: all at once)")
    p.add_argument("--turns", type=int, default=None, help="generate calls per agent")
    p.add_argument("--prompt-tokens", type=int, default=None, help="first turn's system/context prompt")
    p.add_argument("--context-tokens", type=int, default=None, help="tool output appended per later turn")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per turn")
    p.add_argument("--shared-prefix-tokens", type=int, default=None,
                   help="tokens every agent's first prompt starts with (the same for all: a system prompt)")
    p.add_argument("--prefix-sharing", nargs="+", choices=["on", "off"], default=None,
                   help="run each policy with automatic prefix sharing on and/or off (embedded and --api openai)")
    p.add_argument("--tools", nargs="+", default=None,
                   help="tool-time distributions, one sub-sweep each: fixed:S uniform:A,B exp:MEAN lognormal:MED,SIGMA")
    p.add_argument("--time-scale", type=float, default=None,
                   help="multiply arrival gaps and tool times (not compute) by this factor")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--gpu-memory", default=None, help="device budget (weights + KV + workspace), e.g. 20GiB")
    p.add_argument("--host-memory", default=None, help="host memory for parked KV, e.g. 48GiB")
    p.add_argument("--kv-blocks", type=int, default=None, help="explicit device KV block count")
    p.add_argument("--slo-ms", type=float, default=None, help="p99 turn latency a sustained run stays under")
    p.add_argument("--policy-budget-s", type=float, default=None, help="wall-clock bound of one policy's sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", default=None, help="host:port of a running `djinn serve` (one policy per run)")
    p.add_argument("--api", default="native", choices=["native", "openai"],
                   help="openai: per policy, start `python -m djinn.server.http` and drive the agents with "
                        "openai.AsyncOpenAI (whole conversation per request, forced tool calls)")
    p.add_argument("--token", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None)
    return p


def _free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _connect(args: argparse.Namespace, cfg: AgentsPreset, policy: str, sharing: bool = True):
    if args.address:
        try:
            return djinn.connect(args.address, token=args.token)
        except ImportError as exc:  # this build has no remote client yet
            raise djinn.InvalidRequest(f"--address needs the remote client, missing from this build: {exc}") from exc
    return djinn.connect(models=[cfg.model], device=cfg.device, dtype=cfg.dtype, gpu_memory=cfg.gpu_memory,
                         host_memory=cfg.host_memory, policy=policy, kv_blocks=cfg.kv_blocks,
                         block_size=cfg.block_size, seed=args.seed, prefix_sharing=sharing)


def _spec(cfg: AgentsPreset, model, tool: str, n: int, seed: int) -> WorkloadSpec:
    if model is None:   # --api openai: ids index agent_api.WORDS, one word each
        from djinn.bench.agent_api import WORDS

        return WorkloadSpec(n=n, rate=cfg.rate, turns=cfg.turns, prompt_tokens=cfg.prompt_tokens,
                            context_tokens=cfg.context_tokens, new_tokens=cfg.new_tokens, tool=ToolTime.parse(tool),
                            vocab_size=len(WORDS), seed=seed, time_scale=cfg.time_scale,
                            shared_prefix_tokens=cfg.shared_prefix_tokens)
    specials = {getattr(model.config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    specials |= set(getattr(model.tokenizer, "all_special_ids", None) or [])
    flat: set[int] = set()
    for x in specials:
        flat.update(x if isinstance(x, (list, tuple)) else [x])
    return WorkloadSpec(n=n, rate=cfg.rate, turns=cfg.turns, prompt_tokens=cfg.prompt_tokens,
                        context_tokens=cfg.context_tokens, new_tokens=cfg.new_tokens, tool=ToolTime.parse(tool),
                        vocab_size=model.config.vocab_size, seed=seed, time_scale=cfg.time_scale,
                        shared_prefix_tokens=cfg.shared_prefix_tokens,
                        special_ids=tuple(sorted(int(x) for x in flat if isinstance(x, int))))


def _warmup(client, cfg: AgentsPreset, spec: WorkloadSpec) -> float:
    """Two turns of one agent (kernels, allocator); returns a turn's compute seconds."""
    model = client.model(cfg.model)
    plan = build(WorkloadSpec(**{**asdict(spec), "n": 1, "tool": spec.tool, "seed": spec.seed + 10_000}))[0]
    sess = model.session()
    try:
        sess.generate(plan.prompts[0], max_new_tokens=cfg.new_tokens, ignore_eos=True)
        t = time.perf_counter()
        if len(plan.prompts) > 1:
            sess.generate(plan.prompts[1], max_new_tokens=cfg.new_tokens, ignore_eos=True)
        return time.perf_counter() - t
    finally:
        sess.close()


def next_n(cfg: AgentsPreset, done: list[dict]) -> tuple[int | None, str | None]:
    """The next N of one policy's sweep given its runs so far: (N, None), or (None, why it stops).

    Every listed N runs (the comparison grid). With ``until_fail``, a policy that failed at two N
    in a row stops early (its cliff is visible; the rest would only burn the time budget), and
    after the list N grows by x1.25 (multiples of 8) while the last run was sustained, up to
    ``max_n``."""
    if cfg.until_fail and len(done) >= 2 and not done[-1]["sustained"] and not done[-2]["sustained"]:
        return None, "failed at two N in a row"
    if len(done) < len(cfg.n):
        return cfg.n[len(done)], None
    if not cfg.until_fail:
        return None, "end of the list"
    if not done[-1]["sustained"]:
        return None, "failed"
    n = int(math.ceil(done[-1]["n"] * 1.25 / 8) * 8)
    return (n, None) if n <= cfg.max_n else (None, f"reached --max-n {cfg.max_n}")


def _line(run: dict) -> str:
    def ms(d):
        return "-" if d is None else f"{d:.0f}"

    nr = run["no_recompute_share"]
    moved = run["bytes_moved"]
    wc = run.get("wait_choices")
    choice = "" if not wc or not (wc["kept"] or wc.get("standby") or wc["parked"] or wc["off_device"]) else \
        f"IO_WAITs kept {wc['kept']}/standby {wc.get('standby', 0)}/parked {wc['parked'] + wc['off_device']}, "
    slow = (run.get("loop_slow") or {}).get("last") or []
    gcp = run.get("gc_pauses") or {}
    stalls = (f", loop stalls >=0.25 s: {len(slow)} (max {max(x['ms'] for x in slow):.0f} ms)" if slow else "") + \
        (f", gc max {gcp['max_ms']:.0f} ms" if gcp.get("max_ms", 0) >= 50 else "")
    lp = run.get("loop")
    if lp:
        sh = lp["share"]
        stalls += (f", loop: steps {sh['steps']:.0%} (batch {lp['mean_batch'] or 0:.1f}), calls {sh['calls']:.0%}, "
                   f"blocked on room {sh['blocked_room']:.0%}, on the lock {sh.get('blocked_lock', 0):.0%}, idle {sh['idle']:.0%}")
    return (f"[{run['policy']} {run['tool']} n={run['n']}] success {run['success_rate']:.1%} "
            f"turn p50/p99/max {ms(run['turn_ms']['p50'])}/{ms(run['turn_ms']['p99'])}/{ms(run['turn_ms']['max'])} ms, "
            f"TTFT p99 {ms(run['ttft_ms']['p99'])} ms, live agents max {run['live_agents']['max']}, "
            f"no-recompute {'-' if nr is None else f'{nr:.0%}'}, {choice}"
            f"moved {'-' if moved is None else f'{moved / 2**20:.0f} MiB'}, "
            f"{run['wall_s']:.1f} s{' (cut short)' if run['cut_short'] else ''}{stalls}"
            f"{' SUSTAINED' if run['sustained'] else ''}")


class _Api:
    """--api openai: one HTTP server process per policy, in the places the native client goes."""

    def __init__(self, cfg: AgentsPreset, policy: str, sharing: bool = True):
        from djinn.bench import agent_api

        self.mod, self.cfg = agent_api, cfg
        self.server = agent_api.HttpServer(agent_api.server_args(cfg, policy, sharing))
        self.stats = agent_api.ApiStats(self.server).stats

    def warmup(self, spec: WorkloadSpec) -> float:
        plan = build(WorkloadSpec(**{**asdict(spec), "n": 1, "tool": spec.tool, "seed": spec.seed + 10_000}))[0]
        return self.mod.warmup_api(self.server, self.cfg.model, plan)

    def run(self, plans, opts: RunOptions) -> dict:
        return self.mod.run_agents_api(self.server, self.cfg.model, plans, opts)

    def close(self) -> None:
        self.server.stop()


def run_label(cfg: AgentsPreset, policy: str, sharing: bool) -> str:
    """A run's policy label: the policy, and whether prefix sharing was on when both are swept."""
    if tuple(cfg.prefix_sharing) == (True,):
        return policy
    return f"{policy} sharing {'on' if sharing else 'off'}"


def sweep_policy(args: argparse.Namespace, cfg: AgentsPreset, policy: str,
                 sharing: bool = True) -> tuple[list[dict], str]:
    """Every (tool, N) run of one policy on one fresh engine; returns the runs and the device."""
    runs: list[dict] = []
    api = getattr(args, "api", "native") == "openai"
    name, policy = policy, run_label(cfg, policy, sharing)   # ``policy`` labels the runs from here on
    _free_device()
    cuda_base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    if cuda_base:
        print(f"[{policy}] {cuda_base / 2**30:.2f} GiB still allocated from earlier engines (left out of its peak)")
    try:
        client = _Api(cfg, name, sharing) if api else _connect(args, cfg, name, sharing)
    except (djinn.DjinnError, RuntimeError) as exc:
        print(f"[{policy}] could not start: {exc}")
        return [{"policy": policy, "error": f"{type(exc).__name__}: {exc}"}], "cpu"
    try:
        model = None if api else client.model(cfg.model)
        device = ("cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device) if api else \
            str(client.stats().get("device", cfg.device))
        max_ctx = None if api else getattr(model.config, "max_position_embeddings", None)
        cuda_peak = not api and args.address is None and device.startswith("cuda") and torch.cuda.is_available()
        host_wait = wait_host_ready(client)
        if host_wait and host_wait > 0.5:
            print(f"[{policy}] waited {host_wait:.1f} s for the host arena to be pinned")
        budget_end = time.perf_counter() + cfg.policy_budget_s   # model load and host pinning not counted
        for tool in cfg.tools:
            turn_s = None
            done: list[dict] = []
            while True:
                n, why = next_n(cfg, done)
                if n is None:
                    print(f"[{policy} {tool}] sweep ends: {why}")
                    break
                spec = _spec(cfg, model, tool, n, args.seed)
                spec.validate(max_ctx)
                if turn_s is None:
                    try:
                        turn_s = client.warmup(spec) if api else _warmup(client, cfg, spec)
                    except (djinn.DjinnError, RuntimeError) as exc:   # e.g. not even one agent fits: data, not a crash
                        runs.append({"policy": policy, "tool": tool, "n": n,
                                     "error": f"warm-up failed: {type(exc).__name__}: {exc}"})
                        print(f"[{policy} {tool}] warm-up failed: {exc}")
                        break
                left = budget_end - time.perf_counter()
                if left < 5:
                    runs.append({"policy": policy, "tool": tool, "n": n, "skipped": "policy time budget spent"})
                    print(f"[{policy} {tool} n={n}] skipped: the policy's time budget is spent")
                    break
                plans = build(spec)
                expect = plans[-1].arrival_s + sum(plans[-1].tool_s) + n * cfg.turns * turn_s
                opts = RunOptions(new_tokens=cfg.new_tokens, deadline_s=min(left, max(30.0, 3 * expect)),
                                  slo_ms=cfg.slo_ms, progress=not args.no_progress,
                                  label=f"{policy} {tool} n={n}", cuda_peak=cuda_peak, cuda_base=cuda_base)
                run = {"policy": policy, "tool": tool, "tool_mean_s": ToolTime.parse(tool).mean * cfg.time_scale,
                       "tool_nominal_s": ToolTime.parse(tool).mean,
                       "n": n, "base_policy": name, "prefix_sharing": sharing, "deadline_s": opts.deadline_s, "host_arena_wait_s": host_wait,
                       **(client.run(plans, opts) if api else run_agents(client, cfg.model, plans, opts))}
                run["wait_choices"] = wait_choices(run.get("decisions"))
                runs.append(run)
                done.append(run)
                print(_line(run), flush=True)
        return runs, device
    finally:
        client.close()
        del client
        _free_device()


def summarize_policies(runs: list[dict]) -> dict[str, Any]:
    """Per policy and tool: the largest N sustained (100% success, p99 under the SLO) and the first N not."""
    out: dict[str, Any] = {}
    for r in runs:
        if "success_rate" not in r:
            continue
        d = out.setdefault(r["policy"], {}).setdefault(r["tool"], {"max_sustained_n": None, "first_unsustained_n": None,
                                                                    "n": []})
        d["n"].append(r["n"])
        if r["sustained"]:
            d["max_sustained_n"] = max(d["max_sustained_n"] or 0, r["n"])
        elif d["first_unsustained_n"] is None or r["n"] < d["first_unsustained_n"]:
            d["first_unsustained_n"] = r["n"]
    return out


def tool_classes(runs: list[dict]) -> list[dict]:
    """Per policy, tool-time class and N: what the policy did with the IO_WAITs (kept on the
    device or parked, and why), for the runs whose server reported its decisions."""
    rows = []
    for r in runs:
        wc = r.get("wait_choices")
        if "success_rate" not in r or not wc:
            continue
        rows.append({"policy": r["policy"], "tool": r["tool"], "tool_nominal_s": r.get("tool_nominal_s"),
                     "tool_as_run_s": r.get("tool_mean_s"), "n": r["n"], **wc})
    return sorted(rows, key=lambda x: (x["policy"], x["tool_nominal_s"] or 0.0, x["n"]))


def _print_classes(rows: list[dict]) -> None:
    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    for x in rows:
        if not (x["kept"] or x.get("standby") or x["parked"] or x["off_device"]):
            continue    # a policy that ignores IO_WAIT (lru, resident) or drops (recompute)
        why = ", ".join(f"{k} {v}" for k, v in sorted(x["reasons"].items()) if k not in ("short", "long"))
        print(f"{x['policy']} tool {x['tool']} (as run {x['tool_as_run_s']:.3g} s) N={x['n']}: "
              f"{x['io_waits']} IO_WAITs, kept {x['kept']} ({pct(x['kept_share'])}; "
              f"{pct(x['kept_share_estimated'])} of those with an estimate), standby {x.get('standby', 0)} "
              f"(of which parked later for the reserve {x.get('reclaimed', 0)}), parked at once "
              f"{x['parked'] + x['off_device']} ({why}); prefetches {x['prefetches']}, late parks {x['late_parks']}, "
              f"kept then evicted {x['kept_evicted']}; estimates from {x['sources']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("policies", "n", "until_fail", "max_n", "rate", "turns",
                                               "prompt_tokens", "context_tokens", "new_tokens", "tools", "time_scale",
                                               "model", "device", "dtype", "gpu_memory", "host_memory", "kv_blocks",
                                               "slo_ms", "policy_budget_s", "shared_prefix_tokens")}
    if args.prefix_sharing is not None:
        overrides["prefix_sharing"] = [x == "on" for x in dict.fromkeys(args.prefix_sharing)]
    cfg = resolve(args.preset, args.quick, overrides, api=args.api)
    if args.address and args.api == "openai":
        raise djinn.InvalidRequest("--api openai starts its own HTTP server per policy: leave out --address")
    if args.address and len(cfg.policies) != 1:
        raise djinn.InvalidRequest("with --address, name the server's one policy: --policies POLICY")
    for t in cfg.tools:
        ToolTime.parse(t)
    print(f"djinn bench agents, preset {cfg.name}: {cfg.model}, policies {', '.join(cfg.policies)}, N {list(cfg.n)}"
          f"{' then x1.25 until failure (max ' + str(cfg.max_n) + ')' if cfg.until_fail else ''}, tools "
          f"{', '.join(cfg.tools)}, time scale {cfg.time_scale}, budgets gpu {cfg.gpu_memory} host {cfg.host_memory}"
          f" kv_blocks {cfg.kv_blocks}; at most {cfg.policy_budget_s:.0f} s per policy"
          + (f"; shared prefix {cfg.shared_prefix_tokens} tokens" if cfg.shared_prefix_tokens else "")
          + (f"; prefix sharing {'/'.join('on' if s else 'off' for s in cfg.prefix_sharing)}"
             if tuple(cfg.prefix_sharing) != (True,) else ""), flush=True)
    runs: list[dict] = []
    device = cfg.device
    for policy in cfg.policies:
        for sharing in cfg.prefix_sharing:
            got, device = sweep_policy(args, cfg, policy, sharing)
            runs += got
    if not any("success_rate" in r for r in runs):
        print("djinn bench agents: no run completed (see the errors above); nothing written")
        return 2
    measured = [r for r in runs if r.get("tool_to_compute_ratio") is not None]
    ratio = sum(r["tool_to_compute_ratio"] for r in measured) / len(measured) if measured else None
    # runs over the API are their own preset to `bench plot`, so they never replace native runs
    label = cfg.name + ("-openai" if args.api == "openai" else "")
    params = {**asdict(cfg), "preset": label, "seed": args.seed, "address": args.address,
              "tool_to_compute_ratio_mean": ratio,
              "arrival_rate_as_run_per_s": cfg.rate / cfg.time_scale if cfg.rate > 0 else None,
              "time_scale_applies_to": "arrival gaps and tool times (compute is never scaled)",
              "tool_classes_as_run_s": {t: ToolTime.parse(t).mean * cfg.time_scale for t in cfg.tools},
              "mode": "http" if args.api == "openai" else "remote" if args.address else "embedded",
              "api": args.api}
    for r in runs:
        r["api"] = args.api
    results = {"policies": summarize_policies(runs), "tool_classes": tool_classes(runs), "runs": runs,
               "api": args.api}
    if len(cfg.prefix_sharing) > 1:   # the shared-prefix comparison: agents sustained with sharing on vs off
        results["prefix_sharing"] = {
            p: {("on" if s else "off"): results["policies"].get(run_label(cfg, p, s), {}) for s in cfg.prefix_sharing}
            for p in cfg.policies}
    dev = torch.device(device) if device.startswith("cuda") and torch.cuda.is_available() else torch.device("cpu")
    write(record("agents", dev, params, results), args.out, stem=f"agents-{label}")
    for policy, tools in results["policies"].items():
        for tool, d in tools.items():
            print(f"{policy} {tool}: largest N sustained {d['max_sustained_n']}, first N not {d['first_unsustained_n']}")
    _print_classes(results["tool_classes"])
    return 0
