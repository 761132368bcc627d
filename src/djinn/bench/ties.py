"""``djinn bench ties``: can the server's greedy token differ from the reference's with neither
wrong? The question behind a soak divergence (``bench/soak.py``).

Searches random token sequences for positions where the reference's (transformers') two best
logits are closer than ``--threshold`` (the rounding between two correct float32 computations
is about 2e-7 on tiny-llama), then asks the engine (in this process) for the next token there
three ways: the history as one prompt, the history in two turns (the first half's KV cached, as
in every later turn of a session), and as one prompt batched with other sessions' turns. Each
answer is compared with the soak's reference (``generate`` on the full history). A position
where a way differs shows that such a divergence comes from rounding at a near-tie alone.
"""

from __future__ import annotations

import argparse
import random
import threading
import time

import torch

MODEL = "tiny-llama"


def search(model, rng: random.Random, seconds: float, threshold: float, limit: int) -> tuple[int, list[dict]]:
    found, seen, t0 = [], 0, time.monotonic()
    vocab = model.config.vocab_size
    with torch.inference_mode():
        while time.monotonic() - t0 < seconds and len(found) < limit:
            seqs = torch.tensor([[rng.randrange(3, vocab) for _ in range(96)] for _ in range(32)])
            top2 = model(seqs).logits.topk(2, dim=-1)
            gap = top2.values[..., 0] - top2.values[..., 1]
            seen += gap.numel()
            for b, p in (gap < threshold).nonzero().tolist():
                if p >= 4:
                    found.append({"history": seqs[b, :p + 1].tolist(), "gap": float(gap[b, p]),
                                  "top2": top2.indices[b, p].tolist()})
    return seen, found[:limit]


def reference_next(model, history: list[int]) -> int:
    ids = torch.tensor([history])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return int(out[0, -1])


def served_next(m, history: list[int], how: str, rng: random.Random) -> int:
    s = m.session()
    try:
        if how == "prefix_cached":
            k = len(history) // 2
            s.forward(history[:k])
            return s.generate(history[k:], max_new_tokens=1, ignore_eos=True).token_ids[0]
        if how == "one_prompt":
            return s.generate(history, max_new_tokens=1, ignore_eos=True).token_ids[0]
        others = [m.session() for _ in range(5)]            # "batched": five turns run alongside
        prompts = [[rng.randrange(3, 259) for _ in range(4 + 7 * i)] for i in range(5)]
        threads = [threading.Thread(target=o.generate, args=(p,), kwargs={"max_new_tokens": 8, "ignore_eos": True})
                   for o, p in zip(others, prompts)]
        for t in threads:
            t.start()
        tok = s.generate(history, max_new_tokens=1, ignore_eos=True).token_ids[0]
        for t in threads:
            t.join()
        for o in others:
            o.close()
        return tok
    finally:
        s.close()


def run(seconds: float, threshold: float, limit: int, seed: int, repeats: int) -> dict:
    import djinn
    from djinn.config import default_home
    from djinn.models import load_model

    model = load_model(MODEL, device=torch.device("cpu"), home=default_home(), progress=False).model
    rng = random.Random(seed)
    seen, found = search(model, rng, seconds, threshold, limit)
    print(f"ties: {len(found)} positions of {seen} with a top-2 gap under {threshold:g}", flush=True)
    client = djinn.connect(device="cpu", kv_blocks=256)
    m = client.model(MODEL)
    rows = []
    for f in found:
        ref = reference_next(model, f["history"])
        served = {how: [served_next(m, f["history"], how, rng) for _ in range(repeats)]
                  for how in ("one_prompt", "prefix_cached", "batched")}
        differs = {how: sum(t != ref for t in toks) for how, toks in served.items()}
        rows.append({**f, "reference": ref, "served": served, "differs": differs})
        print(f"ties: gap {f['gap']:.3g} top2 {f['top2']} reference {ref} served {served}", flush=True)
    client.close()
    return {"positions_searched": seen, "threshold": threshold, "near_ties": rows,
            "near_ties_where_the_server_differed": sum(1 for r in rows if any(r["differs"].values()))}


def main(argv: list[str] | None = None) -> int:
    from djinn.bench.common import record, write

    p = argparse.ArgumentParser(prog="djinn bench ties", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="time to search for near-ties")
    p.add_argument("--threshold", type=float, default=3e-7, help="top-2 logit gap that counts as a near-tie")
    p.add_argument("--limit", type=int, default=12, help="near-ties to test at most")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = run(a.seconds, a.threshold, a.limit, a.seed, a.repeats)
    params = {k: v for k, v in vars(a).items() if k != "out"} | {"model": MODEL}
    write(record("ties", torch.device("cpu"), params, res), a.out)
    print(f"ties: the server's token differed from the reference's at {res['near_ties_where_the_server_differed']} "
          f"of {len(res['near_ties'])} near-ties")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
