"""Ahead-of-time compilation of the kernels to PTX, for TensorRT's AOT Python plugins.

TensorRT launches an AOT plugin's kernel itself, from the engine, with no Python: it needs the
kernel's name, its PTX, the launch grid and the scalar arguments as shape expressions. This module
produces the first two (and the block size, shared memory) with ``triton.compile``; it needs only
the ``triton`` package — compiling for an explicit :class:`GPUTarget` works on a machine without a
GPU, which is how the tests check it.

The launch contract TensorRT imposes (see ``shared/reference/tensorrt-plugins.md``): parameters are
input pointers, then 32-bit integer scalars, then output pointers; Triton's hidden scratch pointers
are passed as null, so a kernel that needs scratch memory, several CTAs per program, or more than
48 KiB of dynamic shared memory is refused here rather than failing inside an engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Triton type names of the tensor dtypes the plugins accept.
TRITON_DTYPES = ("fp32", "fp16", "bf16")
MAX_SHARED_MEM = 48 * 1024
#: kept rows per program of the CompactKV kernel in the plugin (the grid's second dimension is cdiv(k, 32))
COMPACT_BLOCK_K = 32


def post_vision_blocks(dtype: str) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_N) of the PostVisionStats kernel in the plugin: 32 × 64 for float32 (shared
    memory), 64 × 64 for 16-bit inputs. The CPU stand-in engine (:mod:`vlcache_plugins.standin`)
    launches with the same tiles."""
    return (32 if dtype == "fp32" else 64), 64


@dataclass(frozen=True)
class CompiledKernel:
    """A kernel compiled for one target and one set of compile-time constants.

    Attributes:
        name: the PTX entry name.
        ptx: PTX source text.
        num_warps: warps per program; the CUDA block is ``num_warps * 32`` threads.
        shared_mem: bytes of dynamic shared memory per program.
        num_params: parameters of the PTX entry (runtime arguments + Triton's hidden scratch pointers).
    """

    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    num_params: int

    @property
    def block_x(self) -> int:
        return self.num_warps * 32


def _target(arch: int | None) -> Any:
    from triton.backends.compiler import GPUTarget

    if arch is None:
        from triton.runtime import driver

        return driver.active.get_current_target()
    return GPUTarget("cuda", int(arch), 32)


def _entry_params(ptx: str, name: str) -> int:
    start = ptx.find(f".entry {name}(")
    if start < 0:
        raise RuntimeError(f"entry {name} not found in the compiled PTX")
    end = ptx.find(")", start)
    return ptx[start:end].count(".param")


def _compile(
    fn: Callable[..., None],
    signature: dict[str, str],
    constexprs: dict[str, Any],
    *,
    arch: int | None,
    num_warps: int,
    num_stages: int,
    ptx_version: int | None,
) -> CompiledKernel:
    import triton

    from vlcache_plugins.kernels import compilable, jit

    if not compilable():
        raise RuntimeError("triton was imported with TRITON_INTERPRET set; compile in a process without it")
    kernel = jit(fn, interpret=False)
    full_signature = dict(signature)
    full_signature.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs)
    options: dict[str, Any] = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": False}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    compiled = triton.compile(source, target=_target(arch), options=options)
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError(f"{meta.name} needs Triton scratch memory, which TensorRT does not provide")
    if getattr(meta, "num_ctas", 1) != 1:
        raise RuntimeError(f"{meta.name} uses {meta.num_ctas} CTAs per program; TensorRT launches one")
    if meta.shared > MAX_SHARED_MEM:
        raise RuntimeError(
            f"{meta.name} needs {meta.shared} bytes of shared memory (> {MAX_SHARED_MEM}); use smaller tiles"
        )
    ptx = compiled.asm["ptx"]
    return CompiledKernel(meta.name, ptx, meta.num_warps, meta.shared, _entry_params(ptx, meta.name))


def _check_dtype(dtype: str) -> None:
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype must be one of {TRITON_DTYPES}, got {dtype!r}")


def compile_post_vision_stats(
    *,
    dtype: str,
    head_dim: int,
    threshold: float,
    scale: float,
    block_q: int | None = None,
    block_n: int | None = None,
    arch: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    ptx_version: int | None = None,
) -> CompiledKernel:
    """Compile :func:`~vlcache_plugins.kernels.post_vision_stats_kernel` to PTX.

    Args:
        dtype: Triton name of the query/key dtype: "fp32", "fp16" or "bf16".
        head_dim: D (a build-time constant of the model).
        threshold: p; scale: the softmax scale (resolved: > 0). Both are baked into the kernel.
        block_q, block_n: tiles; default 64 × 64 for 16-bit inputs, 32 × 64 for float32 (shared memory).
        arch: compute capability as an int (90 for H100); None: the GPU of this process.
        ptx_version: cap the PTX ISA version (for drivers older than the compiler's default).

    Runtime parameters, in order: ``q, k, query_start`` pointers; ``H_q, H_kv, τ, m`` (int32);
    ``scores, group_sparsity, row_max, row_sum`` pointers. Launch with grid ``(B, H_kv)``.
    """
    from vlcache_plugins.kernels import block_d, post_vision_stats_kernel

    _check_dtype(dtype)
    if not 0.0 <= threshold < 1.0 or not scale > 0.0 or head_dim < 1:
        raise ValueError(f"need 0 <= threshold < 1, scale > 0, head_dim >= 1; got {threshold}, {scale}, {head_dim}")
    default_q, default_n = post_vision_blocks(dtype)
    block_q = block_q or default_q
    block_n = block_n or default_n
    pointer = f"*{dtype}"
    signature = {
        "q_ptr": pointer,
        "k_ptr": pointer,
        "qs_ptr": "*i64",
        "h_q": "i32",
        "h_kv": "i32",
        "tau": "i32",
        "m": "i32",
        "scores_ptr": "*fp32",
        "sparsity_ptr": "*fp32",
        "row_max_ptr": "*fp32",
        "row_sum_ptr": "*fp32",
    }
    constexprs = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d(head_dim),
        "BLOCK_Q": block_q,
        "BLOCK_N": block_n,
        "THRESHOLD": float(threshold),
        "SCALE": float(scale),
        "UPCAST": dtype == "fp32",
    }
    return _compile(
        post_vision_stats_kernel,
        signature,
        constexprs,
        arch=arch,
        num_warps=num_warps,
        num_stages=num_stages,
        ptx_version=ptx_version,
    )


def compile_compact_kv(
    *,
    dtype: str,
    head_dim: int,
    block_k: int = COMPACT_BLOCK_K,
    arch: int | None = None,
    num_warps: int = 4,
    ptx_version: int | None = None,
) -> CompiledKernel:
    """Compile :func:`~vlcache_plugins.kernels.compact_kv_kernel` to PTX.

    Runtime parameters, in order: ``kv, indices`` pointers; ``m, k`` (int32); ``kept`` pointer.
    Launch with grid ``(B · H_kv, cdiv(k, block_k))``.
    """
    from vlcache_plugins.kernels import block_d, compact_kv_kernel

    _check_dtype(dtype)
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    pointer = f"*{dtype}"
    signature = {"kv_ptr": pointer, "idx_ptr": "*i64", "m": "i32", "k": "i32", "out_ptr": pointer}
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "BLOCK_K": block_k}
    return _compile(
        compact_kv_kernel,
        signature,
        constexprs,
        arch=arch,
        num_warps=num_warps,
        num_stages=1,
        ptx_version=ptx_version,
    )
