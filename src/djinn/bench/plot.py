"""``djinn bench plot``: figures (PNG and PDF) from the JSON that ``bench agents`` and ``bench
resume`` wrote into a directory.

Agents files of one preset are merged (several runs, e.g. one per policy, make one figure; for
the same policy, tool time and N the newest file wins). Per preset:
- ``agents-PRESET-density``: success rate and p99 turn latency versus N, one line per policy
  (the cliff), the SLO dashed;
- ``agents-PRESET-cdf``: turn-latency CDFs per policy at the largest N every policy ran;
- ``agents-PRESET-memory``: device KV, host KV and their budgets over time for one run;
- ``agents-PRESET-choice`` (presets with several tool times): per tool-time class (and N), the
  share of IO_WAITs the ``semantic`` policy kept on the device versus parked, by reason (when
  the server reports its decisions; else bytes moved per turn), and p99 turn latency versus
  tool time per policy.
From the newest resume file: ``resume-crossover``: time to resume versus context and versus
pause depth, one line per method, crossings marked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

POLICY_ORDER = ("semantic", "semantic-park", "lru", "recompute", "resident")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn bench plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default="benchmarks/results", help="directory with the JSON files")
    p.add_argument("--out", default=None, help="where figures go (default: DIR/figures)")
    p.add_argument("--timeline-policy", default="semantic", help="policy whose memory timeline is drawn")
    p.add_argument("--timeline-n", type=int, default=None, help="N of that run (default: the largest)")
    return p


def load(directory: Path) -> tuple[dict[str, dict], dict | None]:
    """(agents runs merged by preset, the resume parts: each from the newest record that has it)."""
    agents: dict[str, dict] = {}
    parts: dict[str, tuple[str, Any, str]] = {}     # part -> (date, data, device)
    for path in sorted(directory.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("bench") == "agents":
            preset = rec["params"].get("preset", "agents")
            slot = agents.setdefault(preset, {"params": rec["params"], "runs": {}, "date": ""})
            for run in rec["results"].get("runs", []):
                if "success_rate" not in run:
                    continue
                key = (run["policy"], run["tool"], run["n"])
                if key not in slot["runs"] or rec["date"] >= slot["runs"][key][0]:
                    slot["runs"][key] = (rec["date"], run)
            if rec["date"] >= slot["date"]:
                slot["params"], slot["date"] = rec["params"], rec["date"]
        elif rec.get("bench") == "resume":
            for part, data in rec["results"].items():
                if part not in parts or rec["date"] >= parts[part][0]:
                    parts[part] = (rec["date"], data, rec.get("device", "?"))
    for slot in agents.values():
        slot["runs"] = [r for _, r in slot["runs"].values()]
    resume = None
    if parts:
        devices = sorted({d for _, _, d in parts.values()})
        resume = {"results": {k: v[1] for k, v in parts.items()}, "device": " / ".join(devices),
                  "date": max(v[0] for v in parts.values())}
    return agents, resume


def _policies(runs: list[dict]) -> list[str]:
    seen = {r["policy"] for r in runs}
    return [p for p in POLICY_ORDER if p in seen] + sorted(seen - set(POLICY_ORDER))


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=150)
    _plt().close(fig)
    return paths


def density(preset: str, slot: dict, out: Path) -> list[Path]:
    plt = _plt()
    runs = slot["runs"]
    tools = sorted({r["tool"] for r in runs})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in _policies(runs):
        for tool in tools:
            pts = sorted((r["n"], r["success_rate"], r["turn_ms"]["p99"]) for r in runs
                         if r["policy"] == policy and r["tool"] == tool)
            if not pts:
                continue
            label = policy if len(tools) == 1 else f"{policy}, {tool}"
            ax1.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
            ax2.plot([p[0] for p in pts], [p[2] if p[2] is not None else float("nan") for p in pts], marker="o",
                     label=label)
    slo = slot["params"].get("slo_ms")
    if slo:
        ax2.axhline(slo, ls="--", color="gray", lw=1, label=f"SLO {slo:.0f} ms")
    ax1.set(xlabel="agents (N)", ylabel="turns completed (%)", title=f"{preset}: success rate", ylim=(-5, 105))
    ax2.set(xlabel="agents (N)", ylabel="p99 turn latency (ms)", title=f"{preset}: p99 turn latency", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, f"agents-{preset}-density")


def cdf(preset: str, slot: dict, out: Path) -> list[Path]:
    plt = _plt()
    runs = slot["runs"]
    tools = sorted({r["tool"] for r in runs})
    fig, axes = plt.subplots(1, len(tools), figsize=(5.5 * len(tools), 4), squeeze=False)
    for ax, tool in zip(axes[0], tools):
        mine = [r for r in runs if r["tool"] == tool]
        per_policy = {p: {r["n"] for r in mine if r["policy"] == p} for p in _policies(mine)}
        common = set.intersection(*per_policy.values()) if per_policy else set()
        n = max(common) if common else max(r["n"] for r in mine)
        for policy in per_policy:
            run = next((r for r in mine if r["policy"] == policy and r["n"] == n), None)
            if run is None:
                continue
            lat = sorted(t["latency_ms"] for t in run["turns"] if t["ok"] and t["latency_ms"] is not None)
            if lat:
                ys = [(i + 1) / run["planned_turns"] for i in range(len(lat))]
                ax.step(lat, ys, where="post", label=f"{policy} ({run['success_rate']:.0%} ok)")
        ax.set(xlabel="turn latency (ms)", ylabel="share of planned turns", xscale="log", ylim=(0, 1.02),
               title=f"{preset}: N={n}, tool {tool}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, f"agents-{preset}-cdf")


def pick_timeline(runs: list[dict], policy: str, n: int | None) -> dict | None:
    mine = [r for r in runs if r.get("timeline")]
    pref = [r for r in mine if r["policy"] == policy] or mine
    if n is not None:
        pref = [r for r in pref if r["n"] == n] or pref
    return max(pref, key=lambda r: (r["n"], r.get("tool_mean_s") or 0)) if pref else None


def memory(preset: str, slot: dict, out: Path, policy: str, n: int | None) -> list[Path]:
    run = pick_timeline(slot["runs"], policy, n)
    if run is None:
        return []
    plt = _plt()
    # device and host on their own axes: a host budget 100x the device's would flatten the device lines
    fig, (dev, host) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    tl = run["timeline"]
    t = [s["t"] for s in tl]
    mib = 2 ** 20
    for ax, lines in ((dev, (("kv_device", "KV on device", "-"), ("kv_moving", "KV being copied", ":"),
                             ("kv_device_capacity", "device KV budget", "--"))),
                      (host, (("kv_host", "KV parked in host memory", "-"), ("kv_host_capacity", "host KV budget", "--")))):
        for key, label, style in lines:
            ys = [s.get(key) for s in tl]
            if any(y is not None for y in ys):
                ax.plot(t, [y / mib if y is not None else float("nan") for y in ys], ls=style, label=label)
        ax.set(ylabel="MiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    dev.set_title(f"{preset}: memory, policy {run['policy']}, N={run['n']}, tool {run['tool']}")
    host.set_xlabel("seconds into the run")
    return _save(fig, out, f"agents-{preset}-memory")


KEEP_PARK = (  # (label, colour, how many of a run's IO_WAITs it counts)
    ("kept: own history", "tab:green", lambda c: c["kept"] - (c.get("kept_by_source") or {}).get("server", 0)),
    ("kept: server-wide estimate", "yellowgreen", lambda c: (c.get("kept_by_source") or {}).get("server", 0)),
    ("standby, stayed on the device", "lightskyblue",
     lambda c: c.get("standby", 0) - min(c.get("reclaimed", 0), c.get("standby", 0))),
    ("standby, parked for the reserve", "tab:blue", lambda c: min(c.get("reclaimed", 0), c.get("standby", 0))),
    ("parked at once: memory needed", "tab:orange", lambda c: c["reasons"].get("memory_needed", 0)),
    ("parked at once: other", "tab:purple", lambda c: c["parked"] - c["reasons"].get("memory_needed", 0)),
    ("already off the device", "lightgray", lambda c: c["off_device"]),
)


def _keep_park(ax, preset: str, runs: list[dict]) -> bool:
    """Stacked bars: per tool-time class (and N), the share of IO_WAITs the policy kept on the
    device versus parked (by reason). False when no run reported keep/park decisions."""
    rows = [r for r in runs if sum((r.get("wait_choices") or {}).get(k, 0)
                                   for k in ("kept", "standby", "parked", "off_device")) > 0]
    if not rows:
        return False
    policy = "semantic" if any(r["policy"] == "semantic" for r in rows) else rows[0]["policy"]
    rows = [r for r in rows if r["policy"] == policy]
    tools = sorted({r["tool"] for r in rows}, key=lambda t: next(r.get("tool_nominal_s") or r["tool_mean_s"]
                                                                  for r in rows if r["tool"] == t))
    ns = sorted({r["n"] for r in rows})
    width = 0.8 / len(ns)
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        for j, n in enumerate(ns):
            run = next((r for r in rows if r["tool"] == tool and r["n"] == n), None)
            if run is None:
                continue
            c = run["wait_choices"]
            total = c["kept"] + c.get("standby", 0) + c["parked"] + c["off_device"]
            x = i - 0.4 + width * (j + 0.5)
            bottom = 0.0
            for label, colour, count in KEEP_PARK:
                share = 100.0 * count(c) / total
                if share > 0:
                    ax.bar(x, share, width * 0.9, bottom=bottom, color=colour)
                    seen.add(label)
                    bottom += share
            ax.annotate(f"N={n}\n{total}", (x, 101), ha="center", va="bottom", fontsize=6)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colour, label=label) for label, colour, _ in KEEP_PARK if label in seen],
              fontsize=6, loc="upper center", ncol=3)
    scale = {r["tool"]: r["tool_mean_s"] for r in rows}
    ax.set_xticks(range(len(tools)))
    ax.set_xticklabels([f"{t.split(':', 1)[-1]} s\n(as run {scale[t]:.3g} s)" for t in tools], fontsize=7)
    ax.set(xlabel="tool time (nominal)", ylabel="share of IO_WAITs (%)", ylim=(0, 140), yticks=range(0, 101, 20),
           title=f"{preset}: {policy}'s choice per IO_WAIT")
    return True


def choice(preset: str, slot: dict, out: Path) -> list[Path]:
    """The policy's choice versus tool time: the share of IO_WAITs kept on the device versus
    parked (when the server reports its decisions; else bytes moved per turn), and p99 turn
    latency versus tool time per policy."""
    runs = slot["runs"]
    if len({r["tool"] for r in runs}) < 2:
        return []
    plt = _plt()
    n = max(r["n"] for r in runs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if not _keep_park(ax1, preset, runs):
        for policy in _policies(runs):
            pts = sorted((r["tool_mean_s"], r) for r in runs if r["policy"] == policy and r["n"] == n)
            ax1.plot([x for x, _ in pts], [(r["bytes_moved_per_turn"] or 0) / 2 ** 20
                                           if r["bytes_moved_per_turn"] is not None else float("nan")
                                           for _, r in pts], marker="o", label=policy)
        if all(r["bytes_moved_per_turn"] is None for r in runs):
            ax1.text(0.5, 0.5, "this server reports neither decisions\nnor bytes moved in its stats", ha="center",
                     va="center", fontsize=8, transform=ax1.transAxes)
        ax1.set(xlabel="tool time (s, as run)", xscale="log", ylabel="MiB moved per completed turn",
                title=f"{preset}: bytes moved per turn (no decision counts in stats), N={n}")
        ax1.grid(alpha=0.3)
    for policy in _policies(runs):
        pts = sorted((r["tool_mean_s"], r) for r in runs if r["policy"] == policy and r["n"] == n)
        ax2.plot([x for x, _ in pts], [r["turn_ms"]["p99"] if r["turn_ms"]["p99"] is not None else float("nan")
                                       for _, r in pts], marker="o", label=policy)
    ax2.set(xlabel="tool time (s, as run)", xscale="log", ylabel="p99 turn latency (ms)", yscale="log",
            title=f"{preset}: p99 turn latency vs tool time, N={n}")
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    scale = slot["params"].get("time_scale")
    if scale not in (None, 1, 1.0):
        fig.suptitle(f"tool times and arrival gaps compressed x{scale} as run (compute is not)", fontsize=8)
    return _save(fig, out, f"agents-{preset}-choice")


def _curves(ax, part: dict[str, Any], title: str) -> None:
    xs = part["x"]
    for name, ys in part["curves"].items():
        ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=name)
    for label, points in part.get("crossings", {}).items():
        for x in points:
            ax.axvline(x, color="gray", ls=":", lw=1)
            ax.annotate(f"{x:.0f}", (x, ax.get_ylim()[1]), fontsize=6, rotation=90, va="top")
    ax.set(xlabel=part["x_label"], ylabel="time to resume (ms)", title=title, yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def crossover(rec: dict, out: Path) -> list[Path]:
    plt = _plt()
    res = rec["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ctx = res.get("context")
    if ctx:
        _curves(ax1, ctx, f"resume vs context ({ctx['model']})")
        ax1.set_xscale("log", base=2)
    else:
        ax1.text(0.5, 0.5, "context part not run", ha="center", va="center", transform=ax1.transAxes)
    depth = res.get("depth")
    if depth and depth.get("status") == "ok":
        _curves(ax2, depth, f"resume vs pause depth ({depth['model']}, {depth['tokens']} tokens)")
    else:
        reason = (depth or {}).get("reason", "depth part not run")
        ax2.text(0.5, 0.5, f"pause depth: unavailable\n({reason})", ha="center", va="center", fontsize=8,
                 transform=ax2.transAxes, wrap=True)
        ax2.set_axis_off()
    fig.suptitle(f"{rec['device']}", fontsize=9)
    return _save(fig, out, "resume-crossover")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    directory = Path(args.dir)
    out = Path(args.out) if args.out else directory / "figures"
    out.mkdir(parents=True, exist_ok=True)
    agents, resume = load(directory)
    made: list[Path] = []
    for preset, slot in sorted(agents.items()):
        if not slot["runs"]:
            continue
        made += density(preset, slot, out)
        made += cdf(preset, slot, out)
        made += memory(preset, slot, out, args.timeline_policy, args.timeline_n)
        made += choice(preset, slot, out)
    if resume is not None:
        made += crossover(resume, out)
    if not made:
        print(f"no agents or resume JSON in {directory}: nothing to plot")
        return 1
    for p in made:
        print(f"wrote {p}")
    return 0
