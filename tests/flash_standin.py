"""A stand-in for flash-attn 2's `flash_attn_func` and `flash_attn_varlen_func`, for testing posenc's flash path
on machines where flash-attn cannot be installed. Inject it as `sys.modules["flash_attn"]`.

It follows flash-attn 2's documented semantics (the docstrings in flash_attn/flash_attn_interface.py, and the
argument checks in csrc/flash_attn/flash_api.cpp), computed independently in float64 with masks built
explicitly:
- Same signatures, argument order and defaults. q, k, v: [batch, seqlen, nheads, headdim] (dense) or
  [total, nheads, headdim] with int32 `cu_seqlens_q` / `cu_seqlens_k` ([batch + 1], cumulative lengths) and
  `max_seqlen_q` / `max_seqlen_k` (varlen). Returns `out` shaped like q, in q's dtype.
- `softmax_scale` scales q k^T before the softmax; None means 1 / sqrt(headdim).
- GQA/MQA: nheads_k must divide nheads; query head i reads kv head i // (nheads // nheads_k) (6 query heads on
  2 kv heads: heads 0, 1, 2 read kv head 0, heads 3, 4, 5 kv head 1).
- `causal` aligns the mask to the bottom-right corner: query i sees key j iff j <= i + seqlen_k - seqlen_q
  (seqlen_q=2, seqlen_k=5 keeps 11110 / 11111). In varlen each sequence uses its own lengths. A query row that
  sees no key outputs 0.
- `window_size=(left, right)`, -1 meaning unbounded: query i sees keys in
  [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; causal sets right to 0.
- `dropout_p`: each attention probability is dropped with probability p and the kept ones are scaled by
  1 / (1 - p). The distribution is flash-attn's; the random pattern is torch's, not flash-attn's Philox one.
- It raises RuntimeError with flash-attn's message where flash-attn refuses: q/k/v not float16/bfloat16 or of
  different dtypes, last dimension not contiguous, batch size 0, headdim > 256, nheads not a multiple of
  nheads_k, k/v shapes that do not match q, cu_seqlens not int32, not contiguous or not [batch + 1], and CUDA
  tensors on a GPU older than Ampere (compute capability < 8).

Where it differs from flash-attn, on purpose:
- It runs on any device, CPU included (flash-attn needs CUDA), so CI exercises posenc's flash path. dtypes are
  *not* relaxed: float32 is refused as flash-attn refuses it, so CPU tests run the layer in float16/bfloat16.
- It is stricter on varlen metadata that flash-attn trusts without checking (there a mistake reads out of
  bounds or leaves rows unwritten): cu_seqlens must start at 0, not decrease, and end at the number of rows
  of q / k, and max_seqlen_q / max_seqlen_k must be at least the longest sequence.
- softcap, alibi_slopes, return_attn_probs and block_table (paged KV) are not modelled: NotImplementedError
  when given anything but their defaults. `deterministic` only concerns the backward pass and is ignored.
- It is differentiable through ordinary autograd (flash-attn has its own backward kernel).
"""
import torch

_MAX_HEADDIM = 256


def keep_mask(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1), device=None):
    """bool [seqlen_q, seqlen_k], True = query i may attend to key j (flash-attn's bottom-right alignment)."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diagonal = i + seqlen_k - seqlen_q  # the key each query is aligned with
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= diagonal + right
    if left >= 0:
        keep &= j >= diagonal - left
    return keep


def _fail(message):
    raise RuntimeError(message)


def _check_tensors(q, k, v):
    if q.dtype not in (torch.float16, torch.bfloat16):
        _fail("FlashAttention only support fp16 and bf16 data type")
    if k.dtype != q.dtype:
        _fail("query and key must have the same dtype")
    if v.dtype != q.dtype:
        _fail("query and value must have the same dtype")
    if not (q.device == k.device == v.device):
        _fail("Expected all tensors to be on the same device")
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 8:
        _fail("FlashAttention only supports Ampere GPUs or newer.")
    for t in (q, k, v):
        if t.stride(-1) != 1:
            _fail("Input tensor must have contiguous last dimension")


def _check_heads(num_heads, num_heads_k, head_dim):
    if head_dim > _MAX_HEADDIM:
        _fail(f"FlashAttention forward only supports head dimension at most {_MAX_HEADDIM}")
    if num_heads_k == 0 or num_heads % num_heads_k:
        _fail("Number of heads in key/value must divide number of heads in query")


def _check_unmodelled(dropout_p, softcap, alibi_slopes, return_attn_probs, block_table=None):
    if softcap != 0.0 or alibi_slopes is not None or return_attn_probs or block_table is not None:
        raise NotImplementedError("the flash-attn stand-in does not model softcap, alibi_slopes, "
                                  "return_attn_probs or block_table")
    if not 0.0 <= dropout_p < 1.0:
        raise NotImplementedError(f"the flash-attn stand-in models dropout_p in [0, 1), got {dropout_p}")


def _attend(q, k, v, scale, causal, window_size, dropout_p):
    """One sequence: q [seqlen_q, nheads, d], k/v [seqlen_k, nheads_k, d] -> float64 [seqlen_q, nheads, d]."""
    seqlen_q, num_heads, _ = q.shape
    seqlen_k, num_heads_k, _ = k.shape
    kv_head = torch.arange(num_heads, device=q.device) // (num_heads // num_heads_k)
    q64, k64, v64 = q.double(), k.double()[:, kv_head], v.double()[:, kv_head]
    scores = torch.einsum("ihd,jhd->hij", q64, k64) * scale
    keep = keep_mask(seqlen_q, seqlen_k, causal, window_size, q.device)
    seen = keep.any(-1, keepdim=True)  # rows that see no key output 0
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~seen, 0.0)
    probs = torch.softmax(scores, -1) * seen
    if dropout_p > 0:
        probs = probs * (torch.rand_like(probs) >= dropout_p) / (1.0 - dropout_p)
    return torch.einsum("hij,jhd->ihd", probs, v64)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q [batch, seqlen_q, nheads, d], k/v [batch, seqlen_k, nheads_k, d] -> out [batch, seqlen_q, nheads, d]."""
    _check_unmodelled(dropout_p, softcap, alibi_slopes, return_attn_probs)
    _check_tensors(q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        _fail("q, k, v must be [batch_size, seqlen, nheads, headdim]")
    batch, _, num_heads, head_dim = q.shape
    if batch <= 0:
        _fail("batch size must be positive")
    _check_heads(num_heads, k.shape[2], head_dim)
    if k.shape[0] != batch or k.shape[3] != head_dim or v.shape != k.shape:
        _fail(f"k and v must be [{batch}, seqlen_k, nheads_k, {head_dim}], got {tuple(k.shape)} and "
              f"{tuple(v.shape)}")
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    out = [_attend(q[b], k[b], v[b], scale, causal, window_size, dropout_p) for b in range(batch)]
    return torch.stack(out).to(q.dtype)


def _check_cu_seqlens(name, cu, rows):
    if cu.dtype != torch.int32:
        _fail(f"{name} must have dtype int32")
    if not cu.is_contiguous():
        _fail(f"{name} must be contiguous")
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or bool((lengths < 0).any()) or int(cu[-1]) != rows:
        raise ValueError(f"stand-in: {name} must start at 0, not decrease and end at {rows}, got {cu.tolist()}")
    return lengths


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q [total_q, nheads, d], k/v [total_k, nheads_k, d], sequence b being rows cu_seqlens[b]:cu_seqlens[b+1]
    -> out [total_q, nheads, d]."""
    _check_unmodelled(dropout_p, softcap, alibi_slopes, return_attn_probs, block_table)
    _check_tensors(q, k, v)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        _fail("q, k, v must be [total, nheads, headdim]")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_k.shape != cu_seqlens_q.shape:
        _fail("cu_seqlens_q and cu_seqlens_k must both be [batch_size + 1]")
    batch = cu_seqlens_q.numel() - 1
    if batch <= 0:
        _fail("batch size must be positive")
    _, num_heads, head_dim = q.shape
    _check_heads(num_heads, k.shape[1], head_dim)
    if k.shape[2] != head_dim or v.shape != k.shape:
        _fail(f"k and v must be [total_k, nheads_k, {head_dim}], got {tuple(k.shape)} and {tuple(v.shape)}")
    for cu in (cu_seqlens_q, cu_seqlens_k):
        if cu.device != q.device:
            _fail("cu_seqlens must be on the device of q")
    len_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    len_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if int(len_q.max()) > max_seqlen_q or int(len_k.max()) > max_seqlen_k:
        raise ValueError(f"stand-in: max_seqlen_q={max_seqlen_q} / max_seqlen_k={max_seqlen_k} are below the "
                         f"longest sequences ({int(len_q.max())} / {int(len_k.max())})")
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    out = []
    for b in range(batch):
        qa, qb, ka, kb = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        out.append(_attend(q[qa:qb], k[ka:kb], v[ka:kb], scale, causal, window_size, dropout_p))
    return torch.cat(out).to(q.dtype)
