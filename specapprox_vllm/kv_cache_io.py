"""Reading a request's keys and values out of vLLM's paged KV cache, by token position.

The cache layout is backend- and ISA-specific; this module is the only place that knows it.
CPU_ATTN (vLLM 0.32) keeps one tensor per layer of shape ``[num_blocks, H_kv, block_size,
2*D]``, viewed by the backend as ``[num_blocks, H_kv, 2*block_size, D]``: per (block, head)
page, the K part then the V part. With ``isa == "vec"`` (fp32, or any dtype without AMX) K is
stored *transposed* as ``[D, block_size]`` while V is row-major ``[block_size, D]`` (found in
the feasibility study and checked by tests/test_specpc_vllm.py against the keys the attention
layer receives). The ``amx`` ISA (bf16 on AMX CPUs) packs K differently and is refused.
"""

from __future__ import annotations

from torch import Tensor

SUPPORTED_CPU_ISAS = ("vec",)


class UnsupportedKVLayout(RuntimeError):
    pass


def check_cpu_layout(isa: str | None) -> None:
    if isa not in SUPPORTED_CPU_ISAS:
        raise UnsupportedKVLayout(
            f"paged-KV reader supports CPU_ATTN isa {SUPPORTED_CPU_ISAS}, got {isa!r}: run the "
            "engine in float32 (bf16 on AMX CPUs uses the packed 'amx' layout)"
        )


def read_cpu_keys(kv_cache: Tensor, block_table_row: Tensor, positions: Tensor) -> Tensor:
    """Keys ``[T, H_kv, D]`` of the tokens at ``positions`` of one request."""
    nb, kvh, bs, two_d = kv_cache.shape
    d = two_d // 2
    k_pages = kv_cache.view(nb, kvh, 2, bs * d)[:, :, 0].view(nb, kvh, d, bs)
    blocks = block_table_row[positions // bs].long()
    return k_pages[blocks, :, :, positions % bs]


def read_cpu_values(kv_cache: Tensor, block_table_row: Tensor, positions: Tensor) -> Tensor:
    """Values ``[T, H_kv, D]`` of the tokens at ``positions`` of one request."""
    nb, kvh, bs, two_d = kv_cache.shape
    d = two_d // 2
    v_pages = kv_cache.view(nb, kvh, 2, bs * d)[:, :, 1].view(nb, kvh, bs, d)
    blocks = block_table_row[positions // bs].long()
    return v_pages[blocks, :, positions % bs, :]

