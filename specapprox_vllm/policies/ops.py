"""The tensor operations every policy is built from (pure torch, no vLLM, no transformers).

Four pieces, implemented once here so that SpecKV,
SnapKV-style, SpecPC and the cascade cannot drift apart:

* :func:`window_probs` -- softmax of the last ``Wq`` post-RoPE queries against all keys, with
  the causal mask inside the last ``Wq x Wq`` block, logits in the input dtype and the softmax
  in float32 (ALGORITHMS.md, "Shared building block" and "Dtypes").
* :func:`pool1d` -- centred 1-D smoothing with zero padding ``(K-1)//2`` left and
  ``K-1-(K-1)//2`` right, so odd and even kernels keep the length (ALGORITHMS.md, SpecPC step 3).
  For max pooling of non-negative scores zero padding equals the ``-inf`` padding of
  ``F.max_pool1d(padding=K//2)`` used by the reference SpecKV for odd kernels.
* :func:`topk_desc` -- top-k in descending score order where ties go to the lower index
  (sort by ``(-score, index)``), vectorised through a stable sort so that CPU and CUDA pick
  the same tokens.
* :func:`first_occurrences` -- order-preserving de-duplication of small index vectors.

Shapes follow vLLM's token-major layout: queries ``[Wq, H_q, D]``, keys ``[S, H_kv, D]``. Query
head ``h`` reads KV head ``h // G`` (``G = H_q / H_kv``), the convention of HF ``repeat_kv`` and
of vLLM's GQA kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "first_occurrences",
    "grouped_window_scores",
    "pool1d",
    "topk_desc",
    "window_probs",
]


def window_probs(q_window: Tensor, keys: Tensor, scale: float | None = None) -> Tensor:
    """Causal softmax of the last ``Wq`` queries against all ``S`` keys, per query head.

    Args:
        q_window: ``[Wq, H_q, D]`` post-RoPE queries of the last ``Wq`` positions of the
            sequence whose keys are ``keys`` (query ``i`` sits at position ``S - Wq + i``).
        keys: ``[S, H_kv, D]`` post-RoPE keys; ``H_q`` must be a multiple of ``H_kv``.
        scale: logit scale, default ``1/sqrt(D)``.

    Returns:
        ``[H_q, Wq, S]`` float32 probabilities. Logits are computed in the input dtype (as the
        model computes them), the softmax in float32; a window query never sees a later key.
    """
    wq, h_q, d = q_window.shape
    s, h_kv, dk = keys.shape
    if dk != d or h_q % h_kv != 0:
        raise ValueError(f"incompatible shapes q={tuple(q_window.shape)} k={tuple(keys.shape)}")
    if wq > s:
        raise ValueError(f"{wq} window queries but only {s} keys")
    g = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = q_window.permute(1, 0, 2).reshape(h_kv, g * wq, d)  # [H_kv, G*Wq, D]
    k = keys.permute(1, 2, 0).to(q.dtype)  # [H_kv, D, S]
    # In place on the fresh matmul output: at 64k keys every extra full-size copy costs
    # about as much as the softmax itself.
    logits = torch.matmul(q, k).view(h_kv, g, wq, s).mul_(scale)
    # Query i (position s - wq + i) may see keys j <= s - wq + i: only the last Wq columns
    # can be in its future, so the mask is Wq x Wq.
    future = torch.ones(wq, wq, dtype=torch.bool, device=keys.device).triu_(1)
    logits[..., s - wq :].masked_fill_(future, float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32).view(h_q, wq, s)


def grouped_window_scores(
    q_window: Tensor, keys: Tensor, n_keys: int | None = None, scale: float | None = None
) -> Tensor:
    """Per-KV-head key scores: max over the ``G`` grouped query heads and all window queries.

    This is the SpecKV / SnapKV-style reduction (ALGORITHMS.md, SpecKV step 3): it is computed
    on the full softmax (all ``S`` keys in the denominator) and only then cut to the first
    ``n_keys`` columns.

    Returns:
        ``[H_kv, n_keys]`` float32 (``n_keys`` defaults to ``S``). Columns past ``S`` (keys
        after the last query, which a chunk of a longer sequence has not reached yet) are 0:
        a causal query gives a later key no probability.
    """
    h_kv = keys.shape[1]
    probs = window_probs(q_window, keys, scale)  # [H_q, Wq, S]
    n = keys.shape[0] if n_keys is None else n_keys
    h_q, wq, s = probs.shape
    out = probs[..., :n].reshape(h_kv, (h_q // h_kv) * wq, min(n, s)).amax(dim=1)
    return out if n <= s else F.pad(out, (0, n - s))


def pool1d(x: Tensor, kernel: int, kind: str = "max") -> Tensor:
    """Centred stride-1 pooling over the last dim with zero padding; keeps the length.

    Padding is ``(K-1)//2`` zeros on the left and ``K-1-(K-1)//2`` on the right, so an even
    kernel looks one step further right than left. ``kind="avg"`` counts the padding zeros
    (as ``F.avg_pool1d(count_include_pad=True)``), which is what the reference does.
    """
    if kernel < 1:
        raise ValueError(f"kernel must be >= 1, got {kernel}")
    if kernel == 1 or x.numel() == 0:
        return x
    lead = x.shape[:-1]
    flat = x.reshape(math.prod(lead), 1, x.shape[-1])
    left = (kernel - 1) // 2
    flat = F.pad(flat, (left, kernel - 1 - left), value=0.0)
    if kind == "max":
        out = F.max_pool1d(flat, kernel_size=kernel, stride=1)
    elif kind == "avg":
        out = F.avg_pool1d(flat, kernel_size=kernel, stride=1)
    else:
        raise ValueError(f"unknown pool kind {kind!r}")
    return out.reshape(*lead, -1)


def topk_desc(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries along the last dim, in descending score order.

    Ties go to the lower index (sort key ``(-score, index)``). ``torch.topk`` gives no such
    guarantee and differs between CPU and CUDA; a stable sort of ``-score`` does. Adding
    ``0.0`` turns ``-0.0`` into ``+0.0`` so that radix sorts (CUDA) see one zero, not two.
    """
    if k > scores.shape[-1]:
        raise ValueError(f"top-{k} of {scores.shape[-1]} entries")
    neg = scores.neg() + 0.0
    order = torch.sort(neg, dim=-1, stable=True).indices
    return order[..., :k]


def first_occurrences(idx: Tensor, upper: int) -> Tensor:
    """Order-preserving de-duplication of a 1-D LongTensor with values in ``[0, upper)``.

    Vectorised: the first position of every value is found with ``scatter_reduce(amin)``;
    an entry is kept iff it sits at its value's first position.
    """
    pos = torch.arange(idx.numel(), device=idx.device)
    first = torch.full((upper,), idx.numel(), dtype=torch.long, device=idx.device)
    first.scatter_reduce_(0, idx, pos, reduce="amin")
    return idx[first[idx] == pos]
