"""Demo: generate with a tiny random LLaVA at budgets 1.0 and 0.1 and print the KV-cache stats.

The model is built offline from a config (random weights: the tokens mean nothing); the point is
the mechanics: the prompt's image tokens, per-layer kept tokens, KV bytes before and after, and that
budget 1.0 reproduces plain generation. Ends stdout with one JSON line.

    .venv/bin/python scripts/demo.py [--method vlcache] [--budgets 1.0,0.1] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import vlcache
from vlcache import CompressionConfig
from vlcache.hf.tiny import llava_inputs, tiny_llava
from vlcache.methods import available


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--method", default=CompressionConfig.method, choices=available())
    p.add_argument("--budgets", default="1.0,0.1", help="comma-separated fractions of the prompt's KV kept")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64, help="pixels; (size/4)^2 image tokens")
    args = p.parse_args()
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
        configs = [CompressionConfig(method=args.method, budget=b) for b in budgets]
    except ValueError as e:
        p.error(str(e))

    model = tiny_llava(seed=0, layers=4, image_size=args.image_size)
    inputs = llava_inputs(model, question_len=24, seed=0)
    rows = []
    for cfg in configs:
        t0 = time.perf_counter()
        r = vlcache.generate(model, inputs, cfg, max_new_tokens=args.max_tokens)
        s = r.stats
        rows.append({**s.to_dict(), "seconds": time.perf_counter() - t0, "tokens": r.new_tokens.tolist()})
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=args.max_tokens, do_sample=False)
    m = inputs["input_ids"].shape[-1]

    print(f"tiny LLaVA (random weights): prompt {m} tokens, {rows[0]['image_tokens']} of them image tokens")
    print(f"{'method':<16}{'budget':>7}{'kept/layer':>22}{'KV before':>12}{'KV after':>12}{'ratio':>8}")
    for row in rows:
        kept = ",".join(str(k) for k in row["kept_per_layer"])
        ratio = row["kv_bytes_after"] / row["kv_bytes_before"]
        print(
            f"{row['method']:<16}{row['budget']:>7.2f}{kept:>22}{row['kv_bytes_before']:>12,}{row['kv_bytes_after']:>12,}{ratio:>8.3f}"
        )
    for row in rows:
        if row["budget"] == 1.0:
            same = row["tokens"] == plain[0, m:].tolist()
            print(f"budget 1.0 reproduces plain model.generate: {same}")
    print(json.dumps({"prompt_tokens": m, "results": rows}))


if __name__ == "__main__":
    main()
