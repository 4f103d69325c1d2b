"""Compile every Triton kernel launch the engine makes, for an H100 (sm_90), on a machine without a GPU.

Triton's interpreter, which runs the kernels in the CPU test suite, accepts programs that the GPU compiler
rejects: a loop-carried value whose type changes (tried: a page counter that becomes int64 only on a decode
graph's int64 lengths) fails to compile, and more shared memory than an SM has fails at launch (read here from
the compiled kernel's metadata). So this runs the model's own forward (eager steps, and the padded static decode
steps a CUDA graph replays) with each kernel swapped for a recorder, then compiles every distinct recorded launch
ahead of time with ``triton.compile`` for target ``cuda:90``; ptxas ships in the triton wheel, so the whole
pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin) runs here.

Run it in a process without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled)::

    python -m tests.kernel_compile            # one JSON line per compiled launch
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

H100 = ("cuda", 90, 32)  # backend, compute capability, warp size
H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64"}


@dataclass(frozen=True)
class HeadShape:
    """The attention shape of a model family: what the kernels specialise on."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


SHAPES = [
    HeadShape("llama3-1b", 32, 8, 64, torch.bfloat16),
    HeadShape("llama3-8b", 32, 8, 128, torch.bfloat16),
    HeadShape("qwen2-0.5b", 14, 2, 64, torch.bfloat16),  # a group of 7: rows padded to a power of two
    HeadShape("llama2-7b", 32, 32, 128, torch.float16),  # no GQA
    HeadShape("tiny", 4, 2, 32, torch.float32),  # fp32: the exact (IEEE) dot products
]


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **constexprs)`` is recorded, not run."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.launches.append((args, constexprs))

        return launch


def argument_type(value) -> str:
    """Triton's signature type for a launch argument, as its launcher would infer it."""
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_launch(kernel, args: tuple, constexprs: dict):
    """The cubin Triton builds for one launch on an H100; ints equal to 1 specialise to constexprs, as at run time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature, constants = {}, {}
    for name, value in zip(names, args):
        if _is_one(value):
            signature[name], constants[(names.index(name),)] = "constexpr", 1
        else:
            signature[name] = argument_type(value)
    for name, value in constexprs.items():
        signature[name], constants[(names.index(name),)] = "constexpr", value
    return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget(*H100))


def _is_one(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == 1


def launch_key(kernel, args: tuple, constexprs: dict) -> tuple:
    types = tuple("1" if _is_one(value) else argument_type(value) for value in args)
    return kernel.__name__, types, tuple(sorted(constexprs.items()))


def record_engine_launches(shape: HeadShape, recorders: list[LaunchRecorder]) -> None:
    """Through the real model and runner: eager steps (mixed prefill, a cached prefix plus a chunk, and decode;
    decode short and long), then the padded static decode steps a CUDA graph replays, sized for long contexts
    (split-K) and for short ones (not split)."""
    runner = _runner(shape)
    block = runner.block_size
    short_decode, long_decode = _batch([(1, 17), (1, 300)], block), _batch([(1, 3000)], block)
    for batch in (_batch([(1, 40), (24, 24), (20, 50)], block), short_decode, long_decode):
        runner.run(batch, with_logits=True)
    for max_model_len, batches in ((4096, (short_decode, long_decode)), (256, (_batch([(1, 9)] * 3, block),))):
        runner.enable_decode_graphs(max_batch=8, max_model_len=max_model_len, with_logits=True, capture=False)
        for batch in batches:
            assert runner.decode_graphs.fits(batch)
            runner.run(batch, with_logits=True)
    assert all(recorder.launches for recorder in recorders), "the forward missed a kernel"


def _runner(shape: HeadShape):
    from workers.attention.triton_backend import TritonBackend
    from workers.kv_cache import KVCacheShape, allocate_kv_cache
    from workers.model import LlamaForCausalLM
    from workers.model_config import parse_model_config
    from workers.presets import PRESETS, hf_config
    from workers.runner import ModelRunner

    raw = hf_config(PRESETS["tiny"]) | {"num_hidden_layers": 1, "num_attention_heads": shape.num_heads,
                                        "num_key_value_heads": shape.num_kv_heads, "head_dim": shape.head_dim}
    model = LlamaForCausalLM(parse_model_config(raw), TritonBackend(), shape.dtype, "cpu")
    cache = KVCacheShape(256, 1, 16, shape.num_kv_heads, shape.head_dim, shape.dtype)
    return ModelRunner(model, allocate_kv_cache(cache, torch.device("cpu")), 16, torch.device("cpu"), max_num_seqs=8,
                       max_model_len=4096)


def _batch(chunks: list[tuple[int, int]], block_size: int):
    """A HostBatch of (query_len, context_len) chunks over disjoint block runs, every chunk sampling."""
    from workers.step_packet import HostBatch
    from workers.table_rows import TableUpdate

    batch, next_block = HostBatch([], [], [], [0], [], [], [], []), 0
    for row, (query_len, context_len) in enumerate(chunks):
        table = list(range(next_block, next_block + -(-context_len // block_size)))
        next_block += len(table)
        positions = list(range(context_len - query_len, context_len))
        batch.token_ids.extend([5] * query_len)
        batch.positions.extend(positions)
        batch.slot_blocks.extend(table[p // block_size] for p in positions)
        batch.query_start_loc.append(len(batch.token_ids))
        batch.context_lens.append(context_len)
        batch.table_rows.append(row)
        batch.table_updates.append(TableUpdate(row, 0, table))
        batch.sample_indices.append(len(batch.token_ids) - 1)
    return batch


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    from workers.attention import triton_backend

    names = ["_paged_attention_kernel", "_split_decode_kernel", "_combine_splits_kernel"]
    recorders = [LaunchRecorder(getattr(triton_backend, name)) for name in names]
    for name, recorder in zip(names, recorders):
        setattr(triton_backend, name, recorder)
    compiled, failed = set(), 0
    for shape in SHAPES:
        for recorder in recorders:
            recorder.launches.clear()
        record_engine_launches(shape, recorders)
        for recorder in recorders:
            for args, constexprs in recorder.launches:
                key = (shape.name, *launch_key(recorder.kernel, args, constexprs))
                if key not in compiled:
                    compiled.add(key)
                    failed += not _report(shape, recorder.kernel, args, constexprs)
    return 1 if failed else 0


def _report(shape: HeadShape, kernel, args: tuple, constexprs: dict) -> bool:
    """Compile one launch and print a JSON line about it; True when it compiled and fits an SM."""
    lens = dict(zip(kernel.arg_names, args)).get("context_lens_ptr")  # int32 eagerly, int64 in a decode graph
    line = {"shape": shape.name, "kernel": kernel.__name__, "lens": None if lens is None else str(lens.dtype),
            "constexprs": {name: str(value) for name, value in constexprs.items()}}
    try:
        binary = compile_launch(kernel, args, constexprs)
    except Exception as error:  # noqa: BLE001 - reported, and the run fails
        line["error"] = f"{type(error).__name__}: {str(error)[-1500:]}"  # the cause is at the end
    else:
        line.update(shared_bytes=binary.metadata.shared, num_warps=binary.metadata.num_warps,
                    cubin_bytes=len(binary.asm["cubin"]))
        if binary.metadata.shared > H100_SHARED_BYTES:
            line["error"] = f"needs {binary.metadata.shared} bytes of shared memory (H100: {H100_SHARED_BYTES})"
    print(json.dumps(line), flush=True)
    return "error" not in line


if __name__ == "__main__":
    sys.exit(main())
