"""Which prompt positions each method keeps on `digits` questions: per layer, the kept count, the
share of the (first) named cell's 16 image tokens kept, and the share of the question's tokens kept.

    .venv/bin/python scripts/fidelity_kept.py --budget 0.1 --methods vlcache,vlcache-uniform,snapkv

Reads ``VLCache.kept_indices`` after each greedy generation (full details in docs/fidelity.md).
Ends with one JSON line of the same figures.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="llava-tiny", help="bundled name or local checkpoint directory")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--methods", default="vlcache,vlcache-uniform,snapkv,h2o,tgvkv,random")
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--kind", choices=("lookup", "compare"), default="lookup", help="question kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlcache import CompressionConfig, VLCache
    from vlcache.digits import DigitScenes, cell_of_patch, format_prompt
    from vlcache.hf.loading import resolve_model

    path = resolve_model(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    scenes = list(DigitScenes("test", seed=args.seed, mix={args.kind: 1.0}).take(args.samples))
    patch = model.config.vision_config.patch_size
    report = []
    for method in args.methods.split(","):
        layers = model.config.text_config.num_hidden_layers
        kept, cell, text = torch.zeros(layers), torch.zeros(layers), torch.zeros(layers)
        for s in scenes:
            inputs = processor(images=s.image, text=format_prompt(s.question), return_tensors="pt")
            ids = inputs["input_ids"][0]
            img = (ids == model.config.image_token_index).nonzero().flatten()
            asked = {int(img[i]) for i in range(len(img)) if cell_of_patch(i, patch) == s.cells[0]}
            question = set(range(int(img[-1]) + 1, len(ids)))
            session = VLCache(CompressionConfig(method=method, budget=args.budget))
            with session.apply(model), torch.no_grad():
                model.generate(**inputs, max_new_tokens=2, do_sample=False)
            for layer, idx in enumerate(session.kept_indices):
                if idx is None:  # nothing evicted in this layer
                    kept[layer] += len(ids)
                    cell[layer] += 1
                    text[layer] += 1
                    continue
                heads = [set(h.tolist()) for h in idx[0]]  # (H_kv, k) for the batch's one sequence
                kept[layer] += idx.shape[-1]
                cell[layer] += sum(len(asked & h) for h in heads) / (len(asked) * len(heads))
                text[layer] += sum(len(question & h) for h in heads) / (len(question) * len(heads))
        n = len(scenes)
        row = {
            "method": method,
            "budget": args.budget,
            "kept_per_layer": [round(float(x / n), 1) for x in kept],
            "asked_cell_kept": [round(float(x / n), 2) for x in cell],
            "question_kept": [round(float(x / n), 2) for x in text],
        }
        report.append(row)
        print(
            f"{method:16s} @ {args.budget}: kept/layer {row['kept_per_layer']} | asked cell kept "
            f"{row['asked_cell_kept']} | question tokens kept {row['question_kept']}"
        )
    print(json.dumps({"samples": len(scenes), "results": report}))


if __name__ == "__main__":
    main()
