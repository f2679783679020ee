"""Decode attention of one layer on the CPU: every kernel this machine offers, side by side.

One decode step's attention in one layer of a batch: ``--rows`` rows, each holding about ``--length``
cached entries (lengths spread over the last ``--spread`` places, as in a running batch) in buffers
of ``--capacity`` entries, ``--q-heads`` query heads over ``--kv-heads`` KV heads of ``--head-dim``,
one new token per row. The kernels:

* **gqa**: ONNX Runtime's ``com.microsoft.GroupQueryAttention`` on the buffers, the new entry
  written in place (what the fused decoder runs every step);
* **gqa-folded**: the same op with a group's query heads passed as query rows of one KV head
  (``attention_bias`` masks the padding keys the op then sees, ``query_seqlens`` lets batch > 1);
* **grouped-ops**: standard ONNX ops over the buffers: a group's query heads against their KV head
  in one MatMul over the whole capacity, a per-row length mask, the new entry's score concatenated,
  Softmax, MatMul with the values plus the new entry's share;
* **torch**: the same grouped computation in torch (``matmul`` → ``softmax`` → ``matmul``);
* **onnx-attention**: the ONNX ``Attention`` op (opset 23) with ``past_key`` / ``past_value``
  (its time includes the Concat of the past into its present outputs).

The reference line **stream once** is numpy summing the unique cache bytes the step needs (every
row's valid keys and values), once: what a kernel bound by memory alone would take. Every kernel's
output is compared with gqa's. The kernels take turns, one call each per round (``_timing``), so
load from other processes hits them alike; each gets ``--threads`` intra-op threads.

Prints a table (median ms per call, vs gqa, vs stream once) and ends with one JSON line. Micro
benchmark: it explains the decode step of ``scripts/bench_batching.py`` (docs/benchmarks.md).

    .venv/bin/python scripts/bench_attention.py                  # the long2k profile's shape
    .venv/bin/python scripts/bench_attention.py --q-heads 9 --kv-heads 3   # SmolLM2-135M's heads
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _timing import median_ms, round_robin
from onnx import TensorProto, helper, numpy_helper

KERNELS = ("gqa", "gqa-folded", "grouped-ops", "torch", "onnx-attention")
#: what a kernel builder returns: (one call, that call's output as (B, 1, H_q·D))
Kernel = tuple[Callable[[], Any], Callable[[], np.ndarray]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rows", type=int, default=8, help="requests in the decode batch")
    p.add_argument("--q-heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=1, help="KV heads (a divisor of --q-heads)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (a multiple of 8)")
    p.add_argument("--length", type=int, default=2665, help="cached entries of the longest row")
    p.add_argument("--spread", type=int, default=200, help="rows hold length - spread .. length entries")
    p.add_argument("--capacity", type=int, default=3177, help="entries the buffers hold per row")
    p.add_argument("--rounds", type=int, default=40, help="timed calls per kernel")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per kernel first")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (ONNX Runtime and torch)")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {', '.join(KERNELS)}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("rows", "q_heads", "kv_heads", "head_dim", "length", "capacity", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.q_heads % args.kv_heads:
        p.error("--kv-heads must divide --q-heads")
    if args.head_dim % 8:
        p.error("--head-dim must be a multiple of 8 (GroupQueryAttention's rule)")
    if not 0 <= args.spread < args.length or args.capacity < args.length + args.q_heads // args.kv_heads:
        p.error("need 0 <= --spread < --length and --capacity >= --length + q-heads/kv-heads (room for the new entry)")
    args.kernel_list = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if not args.kernel_list or set(args.kernel_list) - set(KERNELS) or "gqa" not in args.kernel_list:
        p.error(f"--kernels takes names among {', '.join(KERNELS)}, gqa included (the reference)")
    return args


#: integer inputs of the graphs below (everything else is float32)
INT_INPUTS = {"seqlens": TensorProto.INT32, "total": TensorProto.INT32, "qlens": TensorProto.INT32,
              "lengths": TensorProto.INT64}  # fmt: skip


def _session(
    nodes: list[Any], inputs: list[str], outputs: list[str], inits: dict[str, Any], opset: int, threads: int
) -> Any:
    def info(name: str) -> Any:
        return helper.make_tensor_value_info(name, INT_INPUTS.get(name, TensorProto.FLOAT), None)

    graph = helper.make_graph(
        nodes,
        "attention",
        [info(n) for n in inputs],
        [info(n) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class Case:
    """The random step: queries, new keys/values, per-row lengths, buffers (B, H_kv, C, D)."""

    def __init__(self, args: argparse.Namespace) -> None:
        rng = np.random.default_rng(args.seed)
        b, hq, hkv, d, c = args.rows, args.q_heads, args.kv_heads, args.head_dim, args.capacity
        self.b, self.hq, self.hkv, self.d, self.c, self.group = b, hq, hkv, d, c, hq // hkv
        self.scale = float(1 / np.sqrt(d))
        self.lengths = rng.integers(args.length - args.spread, args.length + 1, b).astype(np.int64)
        self.keys = rng.standard_normal((b, hkv, c, d), dtype=np.float32)
        self.values = rng.standard_normal((b, hkv, c, d), dtype=np.float32)
        self.q = rng.standard_normal((b, 1, hq * d), dtype=np.float32)
        self.k = rng.standard_normal((b, 1, hkv * d), dtype=np.float32)
        self.v = rng.standard_normal((b, 1, hkv * d), dtype=np.float32)

    @property
    def unique_bytes(self) -> int:
        return int(self.lengths.sum()) * self.hkv * self.d * 4 * 2


def gqa(case: Case, threads: int) -> Kernel:
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "pk", "pv", "seqlens", "total"],
        ["o", "present_k", "present_v"],
        domain="com.microsoft",
        num_heads=case.hq,
        kv_num_heads=case.hkv,
        scale=case.scale,
    )
    sess = _session(
        [node], ["q", "k", "v", "pk", "pv", "seqlens", "total"], ["o", "present_k", "present_v"], {}, 17, threads
    )
    keys, values = (
        ort.OrtValue.ortvalue_from_numpy(case.keys.copy()),
        ort.OrtValue.ortvalue_from_numpy(case.values.copy()),
    )
    io = sess.io_binding()
    feeds = {"q": case.q, "k": case.k, "v": case.v, "seqlens": case.lengths.astype(np.int32),
             "total": np.array(int(case.lengths.max()) + 1, np.int32)}  # fmt: skip
    for name, array in feeds.items():
        io.bind_cpu_input(name, array)
    io.bind_ortvalue_input("pk", keys)
    io.bind_ortvalue_input("pv", values)
    io.bind_output("o")
    io.bind_ortvalue_output("present_k", keys)  # the same buffer: written in place
    io.bind_ortvalue_output("present_v", values)
    return lambda: sess.run_with_iobinding(io), lambda: io.copy_outputs_to_cpu()[0]


def gqa_folded(case: Case, threads: int) -> Kernel:
    g, b, hkv, d = case.group, case.b, case.hkv, case.d
    names = ["q", "k", "v", "pk", "pv", "seqlens", "total", "", "", "", "bias", "", "", "", "", "", "qlens"]
    node = helper.make_node(
        "GroupQueryAttention", names, ["o", "present_k", "present_v"], domain="com.microsoft",
        num_heads=hkv, kv_num_heads=hkv, scale=case.scale,
    )  # fmt: skip
    inputs = [n for n in names if n]
    sess = _session([node], inputs, ["o", "present_k", "present_v"], {}, 17, threads)
    keys, values = (
        ort.OrtValue.ortvalue_from_numpy(case.keys.copy()),
        ort.OrtValue.ortvalue_from_numpy(case.values.copy()),
    )
    # query rows = the group's heads; keys: the new one, then g - 1 padding rows the bias hides
    q = case.q.reshape(b, hkv, g, d).transpose(0, 2, 1, 3).reshape(b, g, hkv * d).copy()
    k = np.zeros((b, g, hkv * d), np.float32)
    v = np.zeros((b, g, hkv * d), np.float32)
    k[:, 0], v[:, 0] = case.k[:, 0], case.v[:, 0]
    total = int(case.lengths.max()) + g
    bias = np.zeros((b, 1, g, total), np.float32)
    for r, n in enumerate(case.lengths):
        bias[r, 0, :, n + 1 : n + g] = -np.inf
    io = sess.io_binding()
    feeds = {"q": q, "k": k, "v": v, "seqlens": (case.lengths + g - 1).astype(np.int32),
             "total": np.array(total, np.int32), "bias": bias, "qlens": np.full(b, g, np.int32)}  # fmt: skip
    for name, array in feeds.items():
        io.bind_cpu_input(name, array)
    io.bind_ortvalue_input("pk", keys)
    io.bind_ortvalue_input("pv", values)
    io.bind_output("o")
    io.bind_ortvalue_output("present_k", keys)
    io.bind_ortvalue_output("present_v", values)

    def output() -> np.ndarray:
        o = io.copy_outputs_to_cpu()[0]  # (B, g, H_kv·D): row j = head j of every group
        return o.reshape(b, g, hkv, d).transpose(0, 2, 1, 3).reshape(b, 1, case.hq * d)

    return lambda: sess.run_with_iobinding(io), output


def grouped_ops(case: Case, threads: int) -> Kernel:
    hkv, g, d, hq = case.hkv, case.group, case.d, case.hq
    n = helper.make_node
    nodes = [
        n("Reshape", ["q", "q_shape"], ["qg"]),
        n("Mul", ["qg", "scale"], ["qs"]),  # (B, H_kv, G, D): a group's query heads as rows
        n("Transpose", ["pk"], ["pk_t"], perm=[0, 1, 3, 2]),  # fused into the MatMul by ONNX Runtime
        n("MatMul", ["qs", "pk_t"], ["s_past"]),  # (B, H_kv, G, C)
        n("Reshape", ["k", "k_shape"], ["k_col"]),  # (B, H_kv, D, 1)
        n("MatMul", ["qs", "k_col"], ["s_new"]),  # (B, H_kv, G, 1)
        n("Shape", ["pk"], ["pk_dims"]),
        n("Gather", ["pk_dims", "two"], ["cap"], axis=0),
        n("Range", ["zero", "cap", "one"], ["cols"]),
        n("Unsqueeze", ["lengths", "axes123"], ["len4"]),
        n("GreaterOrEqual", ["cols", "len4"], ["hidden"]),  # (B, 1, 1, C): entries past each row's length
        n("Where", ["hidden", "ninf", "fzero"], ["mask"]),
        n("Add", ["s_past", "mask"], ["s_masked"]),
        n("Concat", ["s_masked", "s_new"], ["s"], axis=-1),
        n("Softmax", ["s"], ["p"], axis=-1),
        n("Gather", ["pk_dims", "two_1d"], ["cap_1d"], axis=0),
        n("Concat", ["cap_1d", "one_1d"], ["split_sizes"], axis=0),
        n("Split", ["p", "split_sizes"], ["p_past", "p_new"], axis=-1),
        n("MatMul", ["p_past", "pv"], ["o_past"]),  # (B, H_kv, G, D)
        n("Reshape", ["v", "v_shape"], ["v_row"]),  # (B, H_kv, 1, D)
        n("Mul", ["p_new", "v_row"], ["o_new"]),
        n("Add", ["o_past", "o_new"], ["o_group"]),
        n("Reshape", ["o_group", "o_shape"], ["o"]),
    ]
    inits = {
        "q_shape": np.array([0, hkv, g, d], np.int64), "scale": np.array(case.scale, np.float32),
        "k_shape": np.array([0, hkv, d, 1], np.int64), "two": np.array(2, np.int64), "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64), "axes123": np.array([1, 2, 3], np.int64), "ninf": np.array(-np.inf, np.float32),
        "fzero": np.array(0, np.float32), "two_1d": np.array([2], np.int64), "one_1d": np.array([1], np.int64),
        "v_shape": np.array([0, hkv, 1, d], np.int64), "o_shape": np.array([0, 1, hq * d], np.int64),
    }  # fmt: skip
    sess = _session(nodes, ["q", "k", "v", "pk", "pv", "lengths"], ["o"], inits, 17, threads)
    io = sess.io_binding()
    for name, array in {"q": case.q, "k": case.k, "v": case.v, "lengths": case.lengths}.items():
        io.bind_cpu_input(name, array)
    io.bind_ortvalue_input("pk", ort.OrtValue.ortvalue_from_numpy(case.keys))
    io.bind_ortvalue_input("pv", ort.OrtValue.ortvalue_from_numpy(case.values))
    io.bind_output("o")
    return lambda: sess.run_with_iobinding(io), lambda: io.copy_outputs_to_cpu()[0]


def torch_grouped(case: Case, threads: int) -> Kernel:
    torch.set_num_threads(threads)
    b, hkv, g, d, c = case.b, case.hkv, case.group, case.d, case.c
    q = torch.from_numpy(case.q).reshape(b, hkv, g, d) * case.scale
    keys, values = torch.from_numpy(case.keys), torch.from_numpy(case.values)
    k_new = torch.from_numpy(case.k).reshape(b, hkv, d, 1)
    v_new = torch.from_numpy(case.v).reshape(b, hkv, 1, d)
    mask = torch.where(torch.arange(c)[None, :] >= torch.from_numpy(case.lengths)[:, None], float("-inf"), 0.0)
    mask = mask.reshape(b, 1, 1, c)
    result: list[torch.Tensor] = []

    def run() -> None:
        scores = torch.cat([torch.matmul(q, keys.transpose(-1, -2)) + mask, torch.matmul(q, k_new)], dim=-1)
        p = torch.softmax(scores, dim=-1)
        out = torch.matmul(p[..., :c], values) + p[..., c:] * v_new
        result[:] = [out]

    return run, lambda: result[0].reshape(b, 1, case.hq * d).numpy()


def onnx_attention(case: Case, threads: int) -> Kernel:
    b, hq, hkv, d = case.b, case.hq, case.hkv, case.d
    length = int(case.lengths.max())
    node = helper.make_node(
        "Attention", ["q", "k", "v", "mask", "pk", "pv"], ["o", "present_k", "present_v"],
        q_num_heads=hq, kv_num_heads=hkv, scale=case.scale,
    )  # fmt: skip
    sess = _session([node], ["q", "k", "v", "mask", "pk", "pv"], ["o", "present_k", "present_v"], {}, 23, threads)
    mask = np.where(np.arange(length + 1)[None, :] < case.lengths[:, None], 0.0, -np.inf).astype(np.float32)
    mask[:, length] = 0.0  # the new entry, appended after the longest row's past
    feeds = {
        "q": case.q.reshape(b, 1, hq, d).transpose(0, 2, 1, 3).copy(),
        "k": case.k.reshape(b, 1, hkv, d).transpose(0, 2, 1, 3).copy(),
        "v": case.v.reshape(b, 1, hkv, d).transpose(0, 2, 1, 3).copy(),
        "mask": mask.reshape(b, 1, 1, length + 1),
        "pk": np.ascontiguousarray(case.keys[:, :, :length]),
        "pv": np.ascontiguousarray(case.values[:, :, :length]),
    }
    result: list[np.ndarray] = []

    def run() -> None:
        result[:] = [sess.run(["o"], feeds)[0]]

    return run, lambda: result[0].transpose(0, 2, 1, 3).reshape(b, 1, hq * d)


BUILDERS = {"gqa": gqa, "gqa-folded": gqa_folded, "grouped-ops": grouped_ops, "torch": torch_grouped,
            "onnx-attention": onnx_attention}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    case = Case(args)
    calls: dict[str, Callable[[], Any]] = {}
    outputs: dict[str, Callable[[], np.ndarray]] = {}
    skipped: dict[str, str] = {}
    for name in args.kernel_list:
        try:
            calls[name], outputs[name] = BUILDERS[name](case, args.threads)
            calls[name]()
        except Exception as e:  # noqa: BLE001 - an op this onnxruntime lacks is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            calls.pop(name, None)
    views = [(case.keys[r, :, :n], case.values[r, :, :n]) for r, n in enumerate(case.lengths)]

    def stream_once() -> None:
        for keys, values in views:
            keys.sum()
            values.sum()

    def timed(fn: Callable[[], Any]) -> Callable[[int], float]:
        def step(_round: int) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        return step

    steps = {name: timed(fn) for name, fn in calls.items()}
    steps["stream once"] = timed(stream_once)
    times = round_robin(steps, args.rounds, args.warmup)
    reference = outputs["gqa"]()
    base, floor = median_ms(times["gqa"]), median_ms(times["stream once"])
    print(
        f"decode attention of one layer: {case.b} rows x {int(case.lengths.min())}-{int(case.lengths.max())} entries "
        f"(buffers of {case.c}), {case.hq} query heads over {case.hkv} "
        f"KV heads, head_dim {case.d}; {args.threads} thread(s), {args.rounds} calls each (median); "
        f"unique KV {case.unique_bytes / 1e6:.1f} MB"
    )
    header = f"{'kernel':>16} {'ms/call':>9} {'vs gqa':>8} {'vs stream once':>15} {'max |diff| vs gqa':>18}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, seconds in times.items():
        ms = median_ms(seconds)
        diff = 0.0 if name in ("gqa", "stream once") else float(np.abs(outputs[name]() - reference).max())
        rows.append({"kernel": name, "ms": ms, "speed_vs_gqa": base / ms, "times_stream_once": ms / floor,
                     "max_abs_diff_vs_gqa": None if name == "stream once" else diff})  # fmt: skip
        shown = "-" if name == "stream once" else f"{diff:.1e}"
        print(f"{name:>16} {ms:>9.3f} {base / ms:>7.2f}x {ms / floor:>14.2f}x {shown:>18}")
    for name, why in skipped.items():
        print(f"{name:>16} skipped: {why}")
    summary = {
        "shape": {"rows": case.b, "q_heads": case.hq, "kv_heads": case.hkv, "head_dim": case.d, "capacity": case.c,
                  "lengths": case.lengths.tolist()},
        "threads": args.threads, "rounds": args.rounds, "unique_kv_bytes": case.unique_bytes,
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "onnx": onnx.__version__},
        "results": rows, "skipped": skipped,
    }  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
