"""Peer comparison: NVIDIA kvpress's presses on the `digits` task, in `vlcache-eval`'s row format.

kvpress (https://github.com/NVIDIA/kvpress) is not a dependency of vlcache: 0.5.5 pins
transformers < 5.3 and needs numpy >= 2, so it runs in its own virtual environment::

    python3 -m venv .venv-kvpress
    .venv-kvpress/bin/pip install torch==2.13.0          # first: the CPU wheel from the local store
    .venv-kvpress/bin/pip install kvpress==0.5.5 "transformers>=5.2,<5.3" scikit-learn pillow
    PYTHONPATH=. .venv-kvpress/bin/python scripts/peer_kvpress.py --model llava-tiny --samples 200 \\
        --reference /tmp/peer-eval/results.json

Only ``vlcache.eval.{tasks,datasets,metrics}`` are imported from vlcache (numpy, PIL and
scikit-learn); the model runs on the venv's own transformers.

How a press meets a LLaVA model: a kvpress press is a context manager that hooks ``self_attn`` of
``model.model.language_model`` — for ``LlavaForConditionalGeneration`` that is the Llama decoder
that receives the merged image + text embeddings. So, exactly as ``vlcache-eval`` does, each
sample goes through the processor (``<image> question``) and greedy ``model.generate`` with
``max_new_tokens`` tokens; the press is active during the call, compresses every layer's cache at
the end of the prefill (its hook fires only when ``cache_position[-1] + 1 == q_len``), and decoding
runs on the compressed cache with positions that keep counting from the prompt length m. The
answer is read with the task's ``parse_answer`` and scored by exact match.

Budgets: kvpress's ``compression_ratio`` is the fraction removed, so ``compression_ratio = 1 −
budget``; a ScorerPress keeps ``max(1, int(m · budget))`` entries per layer and KV head. At budget
1.0 the press is still applied (ratio 0: the hook runs and keeps the cache as it is) and must
reproduce the ``full`` row (no press) sample by sample. ``kv_kept`` is measured, not computed:
Σ_l (cache length of layer l right after the prefill) / Σ_l (its length before compression), read
from the cache tensors by hooks around the press's own hook.

Checkpoints written by transformers 5.24 keep the CLIP tower's weights under ``vision_tower.*``,
while 5.2's ``CLIPVisionModel`` expects ``vision_tower.vision_model.*``: 5.2's ``from_pretrained``
leaves the vision tower randomly initialised (with only a load report saying so); :func:`load_llava`
maps the names and checks that every weight of the model comes from the checkpoint.

``--reference DIR/results.json`` (from ``vlcache-eval`` on the same samples, seed and split) checks
that the questions are the same, that the ``full`` predictions agree sample by sample, and prints
one table with vlcache's rows and kvpress's, and how often each press gives the same answer as
vlcache-eval's ``snapkv``. ``--dump-vlcache-kept F`` (run with vlcache's own ``.venv``) records the
positions vlcache's snapkv keeps on the first ``--kept-samples`` samples; ``--compare-kept F`` (run
here) counts the kept (layer, KV head, position) entries each press shares with them. Ends stdout
with one JSON line ``{"results": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUDGETS = "1.0,0.2,0.1,0.05,0.02,0.01"
# name -> (kvpress class, keyword arguments); kvpress's defaults unless the name says otherwise.
PRESSES: dict[str, tuple[str, dict[str, Any]]] = {
    "snapkv": ("SnapKVPress", {}),  # window 64, avg-pool kernel 5
    "snapkv-w32": ("SnapKVPress", {"window_size": 32}),  # vlcache's snapkv window
    "expected_attention": ("ExpectedAttentionPress", {}),  # 512 future positions, 4 sinks, vnorm
    # Diagnostic: kvpress's machinery (hook, per-head top-k, int(m·budget) per layer) with vlcache's
    # snapkv scoring choices: window 32, scores over all m keys, max-pool kernel 5 (kvpress: avg-pool
    # over the keys before the window), and the most recent window tokens kept first when k < window
    # (kvpress: an arbitrary subset, all window scores tie).
    "snapkv-vlmatch": ("_VLMatchedSnapKV", {"window_size": 32}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llava-tiny", help="'llava-tiny' (vlcache/models/llava-tiny) or a checkpoint dir")
    p.add_argument("--presses", default="snapkv,expected_attention", help=f"comma-separated, from {', '.join(PRESSES)}")
    p.add_argument("--budgets", default=BUDGETS, help="comma-separated budgets in (0, 1] (fraction kept)")
    p.add_argument("--samples", type=int, default=100, help="first N samples of the digits split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--max-tokens", type=int, default=4, help="as vlcache-eval's digits answers")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--reference", type=Path, default=None, help="vlcache-eval results.json on the same samples")
    p.add_argument("--out", type=Path, default=None, help="write rows and every prediction to this JSON file")
    p.add_argument("--show-kept", action="store_true", help="print the positions each press keeps on sample 0")
    p.add_argument(
        "--dump-vlcache-kept",
        type=Path,
        default=None,
        help="run under vlcache's own .venv: write the positions vlcache's --kept-method keeps on the first\n"
        "--kept-samples samples at every budget to this JSON file, and exit",
    )
    p.add_argument("--kept-method", default="snapkv", help="the vlcache method --dump-vlcache-kept records")
    p.add_argument("--kept-samples", type=int, default=20, help="samples whose kept positions are compared")
    p.add_argument(
        "--compare-kept",
        type=Path,
        default=None,
        help="a --dump-vlcache-kept file: print how many kept (layer, head, position) entries each press\n"
        "shares with vlcache's method on those samples",
    )
    return p.parse_args(argv)


def model_path(spec: str) -> Path:
    path = REPO / "vlcache" / "models" / spec if spec == "llava-tiny" else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        sys.exit(f"peer_kvpress: no checkpoint at {path} (config.json missing)")
    return path


def _candidates(key: str) -> list[str]:
    """Names a checkpoint key may have in transformers 5.2's LlavaForConditionalGeneration."""
    out = [key, f"model.{key}"]
    if key.startswith("language_model.model."):
        out.append("model.language_model." + key.removeprefix("language_model.model."))
    if key.startswith("language_model.lm_head."):
        out.append(key.removeprefix("language_model."))
    for prefix in ("vision_tower.", "model.vision_tower."):
        if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
            out.append("model.vision_tower.vision_model." + key.removeprefix(prefix))
    return out


def load_llava(path: Path) -> tuple[Any, Any, dict[str, int]]:
    """(model, processor, {"renamed": n}) with every weight of ``path`` loaded strictly."""
    import torch
    import transformers
    from safetensors.torch import load_file

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation={"text_config": "sdpa", "vision_config": "sdpa"}
    )
    target = model.state_dict()
    state: dict[str, Any] = {}
    renamed = 0
    for file in sorted(path.glob("*.safetensors")):
        for key, tensor in load_file(file).items():
            name = next((c for c in _candidates(key) if c in target), None)
            if name is None or name in state:
                sys.exit(f"peer_kvpress: cannot place checkpoint weight {key!r} in transformers' LLaVA model")
            renamed += name != key
            state[name] = tensor
    missing = set(target) - set(state)
    if "lm_head.weight" in missing and model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        sys.exit(f"peer_kvpress: checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    model.eval()
    return model, processor, {"renamed": renamed, "weights": len(state)}


class CacheProbe:
    """Hooks around the press's hook: the cache of each layer before and after compression."""

    def __init__(self, model: Any) -> None:
        lm = model.model.language_model
        self.layers = [layer.self_attn for layer in lm.layers]
        self.before: dict[int, Any] = {}
        self.after: dict[int, Any] = {}
        self.handles: list[Any] = []

    def _record(self, store: dict[int, Any]) -> Any:
        def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
            cache = kwargs["past_key_values"]
            q_len = kwargs["hidden_states"].shape[1]
            if int(kwargs["cache_position"][-1]) + 1 == q_len:  # prefill (kvpress's own test)
                layer = cache.layers[module.layer_idx]
                store[module.layer_idx] = (layer.keys.detach().clone(), layer.values.detach().clone())
            return output

        return hook

    def attach_before(self) -> None:
        self.handles += [m.register_forward_hook(self._record(self.before), with_kwargs=True) for m in self.layers]

    def attach_after(self) -> None:
        self.handles += [m.register_forward_hook(self._record(self.after), with_kwargs=True) for m in self.layers]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def stats(self) -> dict[str, Any]:
        n = len(self.layers)
        if len(self.before) != n or len(self.after) != n:
            raise RuntimeError(f"prefill hooks fired on {len(self.before)}/{len(self.after)} of {n} layers")
        before = [self.before[i][0].shape[2] for i in range(n)]
        after = [self.after[i][0].shape[2] for i in range(n)]

        def nbytes(store: dict[int, Any]) -> int:
            return sum(int(k.numel() * k.element_size() + v.numel() * v.element_size()) for k, v in store.values())

        return {
            "kept_per_layer": after,
            "prompt_len": before[0],
            "kv_kept": sum(after) / sum(before),
            "kv_bytes_before": nbytes(self.before),
            "kv_bytes_after": nbytes(self.after),
        }

    def kept_positions(self) -> list[list[list[int]]]:
        """Per layer and KV head, the prompt positions whose (key, value) survived (exact match)."""
        import torch

        out = []
        for i in range(len(self.layers)):
            k0, v0 = self.before[i]
            k1, v1 = self.after[i]
            heads = []
            for h in range(k0.shape[1]):
                full = torch.cat([k0[0, h], v0[0, h]], dim=-1)
                kept = torch.cat([k1[0, h], v1[0, h]], dim=-1)
                eq = (kept[:, None, :] == full[None, :, :]).all(-1)
                heads.append(sorted(int(eq[j].nonzero()[0]) for j in range(kept.shape[0])))
            out.append(heads)
        return out


def _vlmatched_snapkv() -> type:
    """The ``snapkv-vlmatch`` press class (defined lazily: kvpress exists only in .venv-kvpress)."""
    import math
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F
    from kvpress import SnapKVPress
    from kvpress.utils import get_prerope_query_states
    from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

    @dataclass
    class VLMatchedSnapKV(SnapKVPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):  # type: ignore[no-untyped-def]
            b, h_kv, m, d = keys.shape
            w = min(self.window_size, m)
            q = get_prerope_query_states(module, hidden_states[:, -w:])
            cos, sin = (t[:, -w:].unsqueeze(1) for t in kwargs["position_embeddings"])
            q = q * cos + rotate_half(q) * sin
            logits = torch.matmul(q, repeat_kv(keys, q.shape[1] // h_kv).transpose(2, 3)) / math.sqrt(d)
            causal = torch.ones(w, m, dtype=torch.bool, device=keys.device).tril(m - w)
            attn = logits.masked_fill(~causal, float("-inf")).softmax(-1, dtype=torch.float32)
            scores = attn.sum(2).reshape(b, h_kv, -1, m).mean(2)  # window sum, then GQA group mean
            scores = F.max_pool1d(scores.reshape(b * h_kv, 1, m), self.kernel_size, 1, self.kernel_size // 2)
            scores = scores.reshape(b, h_kv, m)
            # The window outranks everything, later positions first (vlcache's forced "recent").
            rank = torch.arange(1, w + 1, dtype=scores.dtype, device=scores.device)
            scores[..., m - w :] = scores.max() + 1 + rank
            return scores

    return VLMatchedSnapKV


def make_press(name: str, budget: float) -> Any:
    import kvpress

    cls_name, kwargs = PRESSES[name]
    cls = _vlmatched_snapkv() if cls_name == "_VLMatchedSnapKV" else getattr(kvpress, cls_name)
    return cls(compression_ratio=1.0 - budget, **kwargs)


def answer(
    model: Any, processor: Any, inputs: dict[str, Any], press: Any, max_new_tokens: int
) -> tuple[list[int], str, dict[str, Any]]:
    """Greedy tokens, decoded text and cache stats for one sample under ``press`` (None: no press)."""
    import torch

    probe = CacheProbe(model)
    probe.attach_before()
    try:
        with torch.no_grad():
            if press is None:
                probe.attach_after()
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            else:
                with press(model):  # registers the press's hooks after "before", then "after"
                    probe.attach_after()
                    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        probe.remove()
    tokens = out[0, inputs["input_ids"].shape[-1] :].tolist()
    text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    stats = probe.stats()
    stats["_probe"] = probe
    return tokens, text, stats


def aggregate(records: list[dict[str, Any]], configs: list[tuple[str, float]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {c: [] for c in configs}
    for r in records:
        groups[(r["method"], r["budget"])].append(r)
    ref = groups[("full", 1.0)]
    ref_acc = sum(r["score"] for r in ref) / len(ref)
    rows = []
    for (method, budget), rs in groups.items():
        acc = sum(r["score"] for r in rs) / len(rs)
        kinds: dict[str, list[float]] = {}
        for r in rs:
            kinds.setdefault(r["kind"], []).append(r["score"])
        rows.append(
            {
                "method": method,
                "budget": budget,
                "n": len(rs),
                "accuracy": acc,
                "relative": acc / ref_acc if ref_acc else None,
                "kv_kept": sum(r["kv_kept"] for r in rs) / len(rs),
                "per_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
                "kv_bytes_before": sum(r["kv_bytes_before"] for r in rs) / len(rs),
                "kv_bytes_after": sum(r["kv_bytes_after"] for r in rs) / len(rs),
                "seconds": sum(r["seconds"] for r in rs) / len(rs),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    header = ["method", "budget", "accuracy", "relative", "kv_kept"]
    lines = [[r["method"], str(r["budget"]), fmt(r["accuracy"]), fmt(r["relative"]), fmt(r["kv_kept"])] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]

    def join(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([title, join(header), join(["-" * w for w in widths]), *(join(c) for c in lines)])


def check_reference(ref_path: Path, samples: list[Any], records: list[dict[str, Any]], args: argparse.Namespace) -> Any:
    """Compare with vlcache-eval's results.json; returns its rows (exits on a mismatch of samples)."""
    ref = json.loads(ref_path.read_text(encoding="utf-8"))
    if ref.get("seed") != args.seed or ref.get("split") != args.split or ref.get("n") != len(samples):
        sys.exit(
            f"peer_kvpress: {ref_path} is n={ref.get('n')} seed={ref.get('seed')} split={ref.get('split')}, "
            f"this run n={len(samples)} seed={args.seed} split={args.split}"
        )
    for s, entry in zip(samples, ref["samples"]):
        if entry["question"] != s.question or list(entry["answers"]) != list(s.answers):
            sys.exit(f"peer_kvpress: sample {s.index} differs from {ref_path}")
    ours = {r["sample"]: r for r in records if r["method"] == "full"}
    same_tokens = same_pred = 0
    for entry in ref["samples"]:
        theirs = next(p for p in entry["predictions"] if p["method"] == "full")
        mine = ours[entry["index"]]
        same_tokens += theirs["tokens"] == mine["tokens"]
        same_pred += theirs["prediction"] == mine["prediction"]
    print(
        f"reference {ref_path}: full (no press) vs vlcache-eval full: identical tokens on "
        f"{same_tokens}/{len(samples)} samples, identical answers on {same_pred}/{len(samples)}; "
        f"vlcache-eval versions {ref.get('versions')}"
    )
    # Answer agreement of each press with vlcache-eval's own snapkv at the same budget.
    vl = {
        (p["budget"], e["index"]): p["prediction"]
        for e in ref["samples"]
        for p in e["predictions"]
        if p["method"] == "snapkv"
    }
    if vl:
        print("answers identical to vlcache-eval's snapkv at the same budget (samples):")
        pairs: dict[tuple[str, float], list[int]] = {}
        for r in records:
            key = (r["budget"], r["sample"])
            if r["method"] != "full" and key in vl:
                pairs.setdefault((r["method"], r["budget"]), []).append(int(r["prediction"] == vl[key]))
        for (method, budget), same in pairs.items():
            print(f"  {method:<28} @ {budget:<5}: {sum(same)}/{len(same)}")
    return ref["results"], same_tokens


def dump_vlcache_kept(args: argparse.Namespace, budgets: list[float]) -> int:
    """Under vlcache's .venv: vlcache's own kept positions for --kept-method (see --dump-vlcache-kept)."""
    import torch

    from vlcache import CompressionConfig
    from vlcache.config import settings_read_by
    from vlcache.eval.datasets import load_task
    from vlcache.eval.runner import prepare_inputs
    from vlcache.hf.loading import load_model
    from vlcache.hf.session import VLCache

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(str(model_path(args.model)))
    heads = int(loaded.model.config.text_config.num_key_value_heads)
    task = load_task("digits", args.kept_samples, split=args.split, seed=args.seed)
    kept: dict[str, Any] = {}
    for sample in task.samples:
        inputs = prepare_inputs(loaded, sample, task.prompt_style)
        m = int(inputs["input_ids"].shape[-1])
        for budget in budgets:
            if budget >= 1.0:
                continue
            session = VLCache(
                CompressionConfig.create(
                    args.kept_method, budget, **settings_read_by(args.kept_method, {"seed": args.seed})
                )
            )
            with session.apply(loaded.model), torch.no_grad():
                loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False)
            layers = [
                [list(range(m))] * heads if idx is None else [sorted(int(p) for p in h) for h in idx[0].tolist()]
                for idx in session.kept_indices
            ]
            kept[f"{sample.index}@{budget}"] = layers
    args.dump_vlcache_kept.parent.mkdir(parents=True, exist_ok=True)
    payload = {"method": args.kept_method, "samples": args.kept_samples, "seed": args.seed, "kept": kept}
    args.dump_vlcache_kept.write_text(json.dumps(payload), encoding="utf-8")
    print(f"wrote {args.dump_vlcache_kept}: {args.kept_method} kept positions, {len(kept)} (sample, budget) pairs")
    return 0


def kept_overlap(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[tuple[str, float], tuple[int, int, int]]:
    """(press, budget) -> (entries kept by both, by vlcache, by the press), summed over samples, layers, heads."""
    out: dict[tuple[str, float], tuple[int, int, int]] = {}
    for (method, sample, budget), layers in ours.items():
        ref = theirs.get(f"{sample}@{budget}")
        if ref is None:
            continue
        both = sum(len(set(a) & set(b)) for la, lb in zip(layers, ref) for a, b in zip(la, lb))
        n_ref = sum(len(b) for lb in ref for b in lb)
        n_ours = sum(len(a) for la in layers for a in la)
        prev = out.get((method, budget), (0, 0, 0))
        out[(method, budget)] = (prev[0] + both, prev[1] + n_ref, prev[2] + n_ours)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if not all(0.0 < b <= 1.0 for b in budgets):
        sys.exit("peer_kvpress: budgets must lie in (0, 1]")
    if args.dump_vlcache_kept is not None:
        return dump_vlcache_kept(args, budgets)
    import logging
    from importlib.metadata import version

    import torch
    import transformers

    logging.getLogger("kvpress").setLevel(logging.ERROR)  # "LlavaForConditionalGeneration not tested"
    kvpress_version = version("kvpress")

    from vlcache.digits import format_prompt, parse_answer
    from vlcache.eval.datasets import load_task
    from vlcache.eval.metrics import score

    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    unknown = [p for p in presses if p not in PRESSES]
    if unknown:
        sys.exit(f"peer_kvpress: unknown press {unknown[0]!r}; choose from {', '.join(PRESSES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    path = model_path(args.model)
    model, processor, load_info = load_llava(path)
    task = load_task("digits", args.samples, split=args.split, seed=args.seed)
    configs = [("full", 1.0)] + [(f"kvpress-{p}", b) for p in presses for b in budgets]
    print(
        f"kvpress {kvpress_version}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}; model {path} ({load_info['weights']} weights, "
        f"{load_info['renamed']} renamed for transformers {transformers.__version__})",
        flush=True,
    )

    records: list[dict[str, Any]] = []
    kept_positions: dict[tuple[str, int, float], Any] = {}
    t0 = time.perf_counter()
    for i, sample in enumerate(task.samples):
        batch = processor(images=sample.load_image(), text=format_prompt(sample.question), return_tensors="pt")
        inputs = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in batch.items()}
        for method, budget in configs:
            press = None if method == "full" else make_press(method.removeprefix("kvpress-"), budget)
            t = time.perf_counter()
            tokens, text, stats = answer(model, processor, inputs, press, args.max_tokens)
            prediction = parse_answer(text)
            probe = stats.pop("_probe")
            if args.compare_kept is not None and i < args.kept_samples and press is not None and budget < 1.0:
                kept_positions[(method, sample.index, budget)] = probe.kept_positions()
            if args.show_kept and i == 0 and press is not None and budget < 1.0:
                kept = probe.kept_positions()
                m = stats["prompt_len"]
                print(f"sample 0, {method} @ {budget}: m={m}; kept positions (as offsets from m) per layer / KV head:")
                for li, heads in enumerate(kept):
                    print(f"  layer {li}: " + " | ".join(",".join(str(p - m) for p in h) for h in heads))
            records.append(
                {
                    "sample": sample.index,
                    "kind": sample.kind,
                    "method": method,
                    "budget": budget,
                    "prediction": prediction,
                    "text": text,
                    "tokens": tokens,
                    "score": score(sample.metric, prediction, sample.answers),
                    "seconds": time.perf_counter() - t,
                    **stats,
                }
            )
        if (i + 1) % 10 == 0 or i + 1 == len(task.samples):
            print(
                f"  {i + 1}/{len(task.samples)} samples, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
            )

    rows = aggregate(records, configs)
    # The press at budget 1.0 (ratio 0) must reproduce `full` sample by sample.
    full = {r["sample"]: r["tokens"] for r in records if r["method"] == "full"}
    for p in presses:
        if 1.0 in budgets:
            same = sum(
                r["tokens"] == full[r["sample"]]
                for r in records
                if r["method"] == f"kvpress-{p}" and r["budget"] == 1.0
            )
            print(f"kvpress-{p} @ 1.0 vs full: identical tokens on {same}/{len(task.samples)} samples")
    n = len(task.samples)
    title = f"peer_kvpress: digits ({n} samples, {args.split}, seed {args.seed}) on {args.model}"
    print(format_table(rows, title))
    if args.reference is not None:
        ref_rows, _ = check_reference(args.reference, task.samples, records, args)
        merged = [r for r in ref_rows] + [r for r in rows if r["method"] != "full"]
        print()
        print(format_table(merged, f"vlcache-eval ({args.reference}) + kvpress, same {n} samples"))
    if args.compare_kept is not None:
        theirs = json.loads(args.compare_kept.read_text(encoding="utf-8"))
        print()
        print(
            f"kept entries shared with vlcache's {theirs['method']} ({args.compare_kept}), first "
            f"{min(args.kept_samples, n)} samples, all layers and KV heads:"
        )
        print(f"  {'press':<28}  budget  shared  vlcache  kvpress  shared/vlcache  shared/kvpress")
        for (method, budget), (both, n_ref, n_ours) in kept_overlap(kept_positions, theirs["kept"]).items():
            print(
                f"  {method:<28}  {budget:>6}  {both:>6}  {n_ref:>7}  {n_ours:>7}  {both / n_ref:>14.3f}  {both / n_ours:>14.3f}"
            )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "results": rows,
            "n": n,
            "seed": args.seed,
            "split": args.split,
            "model": str(path),
            "versions": {"kvpress": kvpress_version, "transformers": transformers.__version__},
            "records": records,
        }
        args.out.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        print(f"wrote {args.out}")
    print(json.dumps({"results": rows, "n": n, "mode": "single"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
