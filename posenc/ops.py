"""The fused rotary op: schema, reference implementation, fake kernel, autograd, and the checked entry point.

One op rotates q and k together (one launch), in two registered forms:

    posenc::rotary(q, k, cos?, sin?, inv_freq?, positions, scale, rotary_dim, rotated_pairs,
                   interleaved, inverse) -> (q_out, k_out)
    posenc::rotary_(q!, k!, ...same...) -> ()                     # in place; the schema declares the mutation

q, k: [batch, seq, heads, head_dim], any strides. positions: int64 [batch, seq] (batch stride may be 0).
The angle of pair i at position m comes from tables (cos[m, i], sin[m, i]; float32, bfloat16 or float16, read
exactly, unit column stride, any row stride) or from float64 inverse
frequencies (m * inv_freq[i], reduced modulo 2*pi in float64 before a float32 sin/cos; accurate while
|m * inv_freq[i]| <= MAX_ANGLE = 2^28). `rotated_pairs` pairs (from the fastest) rotate; the others are copied
out of place and keep their values in place (bit for bit; the CUDA kernel rewrites, unchanged, those that
share a 16-byte block with rotating channels of their row). In place, q and k must not share memory with each other or with
the other arguments, nor have elements that share memory (expand()): the op refuses such inputs.
Arithmetic is float32 for float32/16/bf16 storage (float64 for float64, which gradcheck uses).

`rotary_reference` below is the specification: the C++ (CPU) and CUDA kernels in csrc/ are tested against it,
and it serves the op when the extension cannot be loaded. Users call `apply_rotary`, which checks its
arguments and raises ValueError/TypeError naming the culprit.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

__all__ = ["apply_rotary", "rotary_reference", "backend", "MAX_HEAD_DIM", "MAX_ANGLE"]

MAX_HEAD_DIM = 512
# The largest |position * inv_freq| whose angle the op forms accurately (csrc/rotary.h, kMaxAngle): float64
# forming and reduction err by up to ~2.6e-16 * |angle|, below float32's own rounding up to here.
MAX_ANGLE = 2**28
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # of q and k
_ARGS = ("Tensor? cos, Tensor? sin, Tensor? inv_freq, Tensor positions, float scale, int rotary_dim, "
         "int rotated_pairs, bool interleaved, bool inverse")

_lib = torch.library.Library("posenc", "DEF")
_lib.define(f"rotary(Tensor q, Tensor k, {_ARGS}) -> (Tensor, Tensor)")
_lib.define(f"rotary_(Tensor(a!) q, Tensor(b!) k, {_ARGS}) -> ()")


# --------------------------------------------------------------------------------------------- reference
def reference_cos_sin(cos, sin, inv_freq, positions, scale, rotated_pairs, inverse, acc_dtype=torch.float32):
    """Per-token cos/sin [batch, seq, rotated_pairs] exactly as the kernels form them."""
    n = rotated_pairs
    if inv_freq is not None:
        angle = positions.to(torch.float64)[..., None] * inv_freq[:n].to(torch.float64)
        # the kernels' roundings exactly: a multiplication by 1/(2*pi), not a division
        angle = angle - 2 * math.pi * torch.round(angle * (1 / (2 * math.pi)))
        angle = angle.to(acc_dtype)
        c, s = torch.cos(angle), torch.sin(angle)
    else:
        c = cos[positions][..., :n].to(acc_dtype)
        s = sin[positions][..., :n].to(acc_dtype)
    return c * scale, s * (-scale if inverse else scale)


def rotary_reference(q, k, cos, sin, inv_freq, positions, scale, rotary_dim, rotated_pairs, interleaved,
                     inverse):
    """The op's specification in plain PyTorch: returns new (q_out, k_out), inputs untouched."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c, s = reference_cos_sin(cos, sin, inv_freq, positions, scale, rotated_pairs, inverse, acc)
    c, s = c[:, :, None, :], s[:, :, None, :]  # broadcast over heads
    n, half = rotated_pairs, rotary_dim // 2

    def rotate(x):
        out = x.clone()
        if interleaved:
            first, second = slice(0, 2 * n, 2), slice(1, 2 * n, 2)
        else:
            first, second = slice(0, n), slice(half, half + n)
        x1, x2 = x[..., first].to(acc), x[..., second].to(acc)
        out[..., first] = (x1 * c - x2 * s).to(x.dtype)
        out[..., second] = (x2 * c + x1 * s).to(x.dtype)
        return out

    return rotate(q), rotate(k)


def _distinct_elements(sizes, strides):
    """A sufficient test that distinct indices of a strided view reach distinct elements (csrc/ops.cpp)."""
    if 0 in sizes:
        return True
    span = 1
    for stride, size in sorted((st, n) for n, st in zip(sizes, strides) if n > 1):
        if stride < span:
            return False
        span += (size - 1) * stride
    return True


def _extent(t):
    if t.numel() == 0:
        return 0, 0
    lo = t.data_ptr()
    return lo, lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _extents_meet(a, b):
    (alo, ahi), (blo, bhi) = _extent(a), _extent(b)
    return alo < ahi and blo < bhi and alo < bhi and blo < ahi


def _disjoint(q, k):
    """q and k proven to share no element, by the rule of csrc/ops.cpp (`disjoint`)."""
    if not _extents_meet(q, k):
        return True
    a, b = (q, k) if k.data_ptr() >= q.data_ptr() else (k, q)
    gap, rem = divmod(b.data_ptr() - a.data_ptr(), a.element_size())
    if rem:
        return False
    if any(n > 1 and m > 1 and s != t for n, m, s, t in zip(a.shape, b.shape, a.stride(), b.stride())):
        return False
    sizes = [max(n, m) for n, m in zip(a.shape, b.shape)]
    strides = [s if n > 1 else t for n, s, t in zip(a.shape, a.stride(), b.stride())]
    for d in range(4):
        for stride in {strides[d], strides[d] if sizes[d] > 1 else a.stride(d)}:
            if stride > 0 and gap % stride == 0 and gap // stride >= a.shape[d]:
                span = sizes.copy()
                span[d] = gap // stride + b.shape[d]
                if _distinct_elements(span, strides[:d] + [stride] + strides[d + 1:]):
                    return True
    return False


def _check_no_overlap(q, k, cos, sin, inv_freq, positions):
    """The in-place op's refusals of shared memory, as csrc/ops.cpp words them (the reference's in-place form)."""
    for name, t in (("q", q), ("k", k)):
        if not _distinct_elements(t.shape, t.stride()):
            raise ValueError(f"posenc::rotary_: {name} has (or may have) elements that share memory (strides "
                             f"{list(t.stride())}, e.g. from expand()), which an in-place rotation would rotate "
                             f"more than once; pass {name}.contiguous() (or clone()) or rotate out of place")
    if not _disjoint(q, k):
        raise ValueError("posenc::rotary_: q and k share (or may share) memory (the same tensor, or overlapping "
                         "views), which an in-place rotation would rotate twice; pass separate tensors (clone() "
                         "one) or rotate out of place")
    for t in (cos, sin, inv_freq, positions):
        if t is not None and (_extents_meet(t, q) or _extents_meet(t, k)):
            raise ValueError("posenc::rotary_: the cos/sin tables, inv_freq or positions share memory with q or "
                             "k, which an in-place rotation writes; clone() them")


def _reference_inplace(q, k, *args):
    _check_no_overlap(q, k, *args[:4])
    q_out, k_out = rotary_reference(q, k, *args)
    q.copy_(q_out)
    k.copy_(k_out)


# ------------------------------------------------------------------------------------ backend selection
def _load_extension():
    """Imports posenc._C (registers the C++/CUDA kernels). Returns (loaded, reason)."""
    if os.environ.get("POSENC_DISABLE_EXTENSION") == "1":
        return False, "POSENC_DISABLE_EXTENSION=1"
    try:
        from posenc import _C  # noqa: F401  (imported for its registrations)
    except Exception as exc:  # ImportError, or an undefined symbol from a torch version mismatch
        if os.environ.get("POSENC_REQUIRE_EXTENSION") == "1":
            raise ImportError(f"POSENC_REQUIRE_EXTENSION=1 but posenc._C failed to load: {exc}") from exc
        warnings.warn(f"posenc: the compiled rotary op did not load ({exc}); using the pure-PyTorch "
                      "reference. Build it with `pip install --no-build-isolation -e .`.", stacklevel=3)
        return False, f"posenc._C failed to load: {exc}"
    return True, "posenc._C loaded"


_EXTENSION, _EXTENSION_REASON = _load_extension()


def _has_kernel(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("posenc::rotary", key)


_HAS_CPU_KERNEL, _HAS_CUDA_KERNEL = _has_kernel("CPU"), _has_kernel("CUDA")
for _key, _has in (("CPU", _HAS_CPU_KERNEL), ("CUDA", _HAS_CUDA_KERNEL)):
    if not _has:  # the reference serves wherever no compiled kernel was registered
        _lib.impl("rotary", rotary_reference, _key)
        _lib.impl("rotary_", _reference_inplace, _key)


if not _EXTENSION:  # what posenc._C registers in C++ for posenc::rotary_ (csrc/rotary_cpu.cpp), for the reference
    def _rotary_inplace_autograd(keyset, q, k, *rest):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise ValueError("posenc::rotary_: q or k requires grad, and the op cannot record an in-place write for "
                             "autograd; use posenc.apply_rotary(..., inplace=True), which does, or posenc::rotary")
        torch.ops.posenc.rotary_.default.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, q, k, *rest)
        torch.autograd.graph.increment_version((q, k))

    _lib.impl("rotary_", _rotary_inplace_autograd, "Autograd", with_keyset=True)


def backend(device: str | torch.device = "cpu") -> str:
    """Which implementation of the rotary op runs on `device`, and why."""
    kind = torch.device(device).type
    if kind == "cpu":
        has = _HAS_CPU_KERNEL
        name = "C++ CPU kernel (posenc._C)"
    elif kind == "cuda":
        has = _HAS_CUDA_KERNEL
        name = "CUDA kernel (posenc._C)"
        if not has and _EXTENSION:
            return "pure-PyTorch reference on cuda: posenc._C was built without CUDA (CPU-only torch or no nvcc)"
    else:
        return f"pure-PyTorch reference on {kind}: no compiled kernel for this device"
    return name if has else f"pure-PyTorch reference on {kind}: {_EXTENSION_REASON}"


# ------------------------------------------------------------------------------------- fake + autograd
def _check_one_device(q, k, cos, sin, inv_freq, positions):
    """The kernels' device check, for the fake kernels: the dispatcher sends a call with any meta tensor to them
    (meta outranks the other devices), where meta positions or frequencies with CPU q and k would otherwise
    give uninitialised CPU tensors."""
    for name, t in (("k", k), ("cos", cos), ("sin", sin), ("inv_freq", inv_freq), ("positions", positions)):
        if t is not None and t.device != q.device:
            raise ValueError(f"posenc::rotary: q, k, the tables or inv_freq and positions must be on one device; "
                             f"q is on {q.device}, {name} on {t.device}")


@torch.library.register_fake("posenc::rotary")
def _rotary_fake(q, k, *args):
    _check_one_device(q, k, *args[:4])
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("posenc::rotary_")
def _rotary_inplace_fake(q, k, *args):
    _check_one_device(q, k, *args[:4])
    return None


def _setup_context(ctx, inputs, output):
    ctx.rest = inputs[2:-1]  # tables/frequencies, positions and the scalars, all but `inverse`
    ctx.inverse = inputs[-1]


def _backward(ctx, grad_q, grad_k):
    # The map is linear in q and k and orthogonal up to `scale`: its transpose is the opposite rotation.
    grad_q, grad_k = torch.ops.posenc.rotary(grad_q, grad_k, *ctx.rest, not ctx.inverse)
    return (grad_q, grad_k) + (None,) * 9


if not _has_kernel("Autograd"):  # posenc._C registers the same autograd in C++ (csrc/rotary_cpu.cpp)
    torch.library.register_autograd("posenc::rotary", _backward, setup_context=_setup_context)


def _rotate_grad(ctx, grad):
    """The backward of one tensor's rotation: the opposite rotation (k with no heads)."""
    return torch.ops.posenc.rotary(grad, grad[:, :, :0], *ctx.rest, not ctx.inverse)[0]


class _RotaryInplace(torch.autograd.Function):
    """In-place rotation inside autograd, in two nodes. Autograd lets a Function that writes into a view return
    one tensor only, and q and k are views more often than not (q_proj(x).view(...), slices of a packed qkv,
    layout="bhsd" or cu_seqlens): this one runs the fused op on both (one launch, the op's checks on the pair)
    and declares q's write (mark_dirty: version bump, history rebased); _RotatedInplace then declares k's. k
    goes in detached, so that q's node has q alone as its input."""

    @staticmethod
    def forward(ctx, q, k_detached, *rest):
        torch.ops.posenc.rotary_(q, k_detached, *rest)
        ctx.mark_dirty(q)
        ctx.rest, ctx.inverse = rest[:-1], rest[-1]
        return q

    @staticmethod
    def backward(ctx, grad):
        return (_rotate_grad(ctx, grad),) + (None,) * 10


class _RotatedInplace(torch.autograd.Function):
    """Declares the in-place rotation of k that _RotaryInplace has just made (the forward writes nothing)."""

    @staticmethod
    def forward(ctx, k, *rest):
        ctx.mark_dirty(k)
        ctx.rest, ctx.inverse = rest[:-1], rest[-1]
        return k

    @staticmethod
    def backward(ctx, grad):
        return (_rotate_grad(ctx, grad),) + (None,) * 9


# ----------------------------------------------------------------------------------------- entry point
def _tracing() -> bool:
    """True under torch.compile or CUDA-graph capture, where data-dependent checks cannot run."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_tensor(name, t, *, float_only=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if float_only and not t.is_floating_point():
        raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got {t.dtype}")


def _check_angles(positions, inv_freq, rotated_pairs, bound=None):
    """Refuses |position * inv_freq| beyond MAX_ANGLE, where the op's angles lose accuracy, for the reference
    serving the CPU (the C++ CPU kernel checks by itself, under torch.compile too). `bound`: the largest
    |position| when known on the host. Not on CUDA, where it would need a host sync."""
    if _tracing() or inv_freq.device.type != "cpu" or _HAS_CPU_KERNEL:
        return
    w = inv_freq[:rotated_pairs].abs().max().item() if rotated_pairs else 0.0
    if not math.isfinite(w):
        raise ValueError(f"inv_freq must be finite, got a largest |inv_freq| of {w}")
    if bound is None:  # (by the extremes: abs() of int64's minimum overflows)
        bound = max(-int(positions.min()), int(positions.max())) if positions.numel() else 0
    if bound * w > MAX_ANGLE:
        raise ValueError(f"positions reach |{bound}|, which with inv_freq up to {w:g} gives angles beyond "
                         f"MAX_ANGLE = 2^28 = {MAX_ANGLE}, where the op's angles are no longer accurate; keep "
                         f"|positions| * max(inv_freq) <= 2^28 (|positions| <= 2^28 for inv_freq <= 1)")


def _positions_from_cu_seqlens(cu_seqlens, total, device):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise TypeError("cu_seqlens must be a 1-D integer tensor [num_sequences + 1]")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    if not _tracing():
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the number of tokens "
                             f"({total}), got {cu_seqlens.tolist()}")
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    return torch.arange(total, device=device) - starts


_TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels read as stored


def _table_half(name, t, rotary_dim, interleaved):
    """cos/sin as transformers builds them ([..., rotary_dim], halves duplicated) or half width
    ([..., rotary_dim/2]) -> the half the kernel reads: a view of t (its first half; rows of any stride) in its
    own dtype where the kernel reads that dtype (float32, bfloat16, float16), else float32; copied only for a
    column stride other than 1 (interleaved tables, whose pairs' values sit at even columns)."""
    if t.shape[-1] == rotary_dim:
        t = t[..., ::2] if interleaved else t[..., : rotary_dim // 2]
    elif t.shape[-1] != rotary_dim // 2:
        raise ValueError(f"{name} must end in rotary_dim={rotary_dim} (halves duplicated) or "
                         f"rotary_dim/2={rotary_dim // 2} channels, got shape {tuple(t.shape)}")
    if t.dtype not in _TABLE_DTYPES:
        t = t.to(torch.float32)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _token_positions(batch, seq, device):
    """0..batch*seq-1 as [batch, seq]: the row of each token in per-token tables flattened to [batch*seq, R]."""
    key = (device, batch, seq, "tokens")
    positions = _DEFAULT_POSITIONS.get(key)
    if positions is None:
        positions = torch.arange(batch * seq, device=device).view(batch, seq)
        if not _tracing():
            if len(_DEFAULT_POSITIONS) >= 64:
                _DEFAULT_POSITIONS.clear()
            _DEFAULT_POSITIONS[key] = positions
    return positions


def _per_token_tables(cos, sin, batch, seq, device):
    """Tables with one row per token ([seq, R], or [batch or 1, seq, R], any strides) -> (cos rows, sin rows,
    positions) for the op's tables indexed by position, as views: rows shared by every batch row (batch 1 or
    batch stride 0, as transformers' position_ids [1, seq] give) are indexed by 0..seq-1."""
    if cos.dim() == 2 and cos.shape[0] == seq:
        return cos, sin, _default_positions(batch, seq, device)
    if cos.dim() == 3 and cos.shape[:2] in ((batch, seq), (1, seq)):
        if all(t.shape[0] == 1 or t.stride(0) == 0 for t in (cos, sin)):
            return cos[0], sin[0], _default_positions(batch, seq, device)
        rows = cos.reshape(-1, cos.shape[-1])  # a view where the strides allow
        return rows, sin.reshape(rows.shape), _token_positions(batch, seq, device)
    raise ValueError(f"without positions, cos/sin must be [seq={seq}, R] or [batch={batch}, seq={seq}, R]"
                     f" (one row per token), got {tuple(cos.shape)}")


_ROTARY = torch.ops.posenc.rotary.default
_DEFAULT_POSITIONS: dict = {}  # (device, batch, seq) -> int64 [batch, seq] view of 0..seq-1, built once


def _default_positions(batch, seq, device):
    """0..seq-1 for every row, [batch, seq] (batch stride 0), cached: no allocation per call in eager code.
    Not cached while tracing (torch.compile) or capturing a CUDA graph (whose kernels run only on replay)."""
    key = (device, batch, seq)
    positions = _DEFAULT_POSITIONS.get(key)
    if positions is None:
        positions = torch.arange(seq, device=device).expand(batch, seq)
        if not _tracing():
            if len(_DEFAULT_POSITIONS) >= 64:
                _DEFAULT_POSITIONS.clear()
            _DEFAULT_POSITIONS[key] = positions
    return positions


def _fast_token_tables(cos, sin, batch, seq, rotary_dim, device):
    """transformers' per-token tables ([1 or batch, seq, R]) as the op reads them: views, one row per position
    when the batch rows share them (batch 1 or batch stride 0), else one row per token (rows of [batch * seq, R],
    as when decoding with per-row positions); None where the full path must check them. Rows are passed whole:
    the op reads a row's first rotated_pairs columns, which in both widths (halves duplicated, or one half) are
    the first half's, so no slicing. Dtypes, devices and strides are the op's to check (see _fast_rotary)."""
    if (type(cos) is not torch.Tensor or type(sin) is not torch.Tensor or cos.dim() != 3 or cos.shape != sin.shape
            or ((cos.requires_grad or sin.requires_grad) and torch.is_grad_enabled())):
        return None
    rows, length, width = cos.shape
    if length != seq or width not in (rotary_dim, rotary_dim // 2):
        return None
    if rows == 1 or (rows == batch and cos.stride(0) == 0 and sin.stride(0) == 0):
        return cos.select(0, 0), sin.select(0, 0), _default_positions(batch, seq, device)
    if rows == batch and (seq == 1 or (cos.stride(0) == seq * cos.stride(1) and sin.stride(0) == seq * sin.stride(1))):
        # views, by the strides tested
        return cos.view(-1, width), sin.view(-1, width), _token_positions(batch, seq, device)
    return None


# What the op raises for arguments it refuses (c10's ValueError, TypeError and IndexError; NotImplementedError, a
# RuntimeError, where no kernel serves the tensors' device or layout), before it touches memory.
_OP_REFUSALS = (ValueError, TypeError, IndexError, RuntimeError)


def _fast_rotary(q, k, cos, sin, positions, inv_freq, scale, rotary_dim, rotated_pairs, interleaved, layout,
                 inverse):
    """The common calls, out of place: float64 inv_freq (Encoding.apply, decoding) or transformers' per-token
    tables (the HF path), run on the op directly; None where the call needs the full path (which then checks and
    explains). Host time is the point: here Python tests only what the op would not refuse by itself (shapes it
    does not know, the numbers' ranges), and what the op refuses (dtypes, devices, strides, layouts, ranges it
    checks) sends the call to the full path, which names the argument. So this accepts only what the full path
    accepts for these arguments, and passes the op the same."""
    if (type(q) is not torch.Tensor or type(k) is not torch.Tensor or q.dim() != 4 or k.dim() != 4
            or type(scale) not in (float, int) or not math.isfinite(scale)):
        return None
    if layout == "bshd":
        q4, k4 = q, k
    elif layout == "bhsd":
        q4, k4 = q.transpose(1, 2), k.transpose(1, 2)
    else:
        return None
    batch, seq, _, head_dim = q4.shape
    kb, ks, _, kd = k4.shape
    if kb != batch or ks != seq or kd != head_dim or head_dim % 2 or head_dim > MAX_HEAD_DIM:
        return None
    if rotary_dim is None:
        rotary_dim = head_dim
    elif type(rotary_dim) is not int or rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        return None
    half = rotary_dim // 2
    if rotated_pairs is None:
        rotated_pairs = half
    elif type(rotated_pairs) is not int or not 0 <= rotated_pairs <= half:
        return None
    if inv_freq is None:
        tables = None if interleaved else _fast_token_tables(cos, sin, batch, seq, rotary_dim, q.device)
        if tables is None:
            return None
        cos, sin, positions = tables
    elif (type(inv_freq) is not torch.Tensor or inv_freq.shape != (half,)
          or (not _HAS_CPU_KERNEL and inv_freq.device.type == "cpu")):  # there, the angles need the full check
        return None
    elif positions is None:
        positions = _default_positions(batch, seq, q.device)
    elif type(positions) is not torch.Tensor:
        return None
    elif positions.dim() == 2 and positions.shape[1] == seq and positions.shape[0] in (batch, 1):
        if positions.shape[0] != batch:
            positions = positions.expand(batch, seq)
    elif positions.dim() == 1 and positions.shape[0] == seq:
        positions = positions.expand(batch, seq)
    else:
        return None
    try:
        q_out, k_out = _ROTARY(q4, k4, cos, sin, inv_freq, positions, float(scale), rotary_dim, rotated_pairs,
                               bool(interleaved), bool(inverse))
    except _OP_REFUSALS:
        return None
    if layout == "bhsd":
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


def apply_rotary(q, k, cos=None, sin=None, positions=None, *, inv_freq=None, scale=1.0, rotary_dim=None,
                 rotated_pairs=None, interleaved=False, layout="bshd", inplace=False, cu_seqlens=None,
                 inverse=False):
    """Rotate q and k together with the fused op; returns (q_out, k_out) in the input layout.

    q: [batch, seq, q_heads, head_dim] ("bshd"), or [batch, heads, seq, head_dim] with layout="bhsd", or
       [total_tokens, heads, head_dim] for packed sequences with cu_seqlens; k the same with its own heads.
    Angles come from either
      cos, sin: tables as transformers builds them, last dim rotary_dim (halves duplicated) or rotary_dim/2.
        With positions=None they hold one row per token: [seq, R] or [batch, seq, R].
        With positions they are [rows, R] tables indexed by position.
        Read as given (no copy) in float32, bfloat16 or float16 with any strides but a unit last-dim stride
        (the first half of duplicated halves is a view); other float dtypes are converted to float32.
      inv_freq: [rotary_dim/2] inverse frequencies (any float dtype; angles formed in float64).
    positions: int [seq] or [batch, seq] (per-row offsets, left padding, KV-cache decoding); default 0..seq-1,
      or per-sequence 0..len-1 with cu_seqlens (given both, the positions are used and cu_seqlens is still
      validated). With inv_freq, |positions| * max(inv_freq) must stay within MAX_ANGLE = 2^28, where the angles
      are accurate (checked where cheap: positions on the CPU or the default ones; not under torch.compile).
    scale multiplies cos and sin (YaRN/LongRoPE attention factor). rotary_dim (default head_dim) channels
    take part; the first rotated_pairs (default all) pairs rotate. inplace=True writes into q and k (also
    inside autograd and on views, which the op's schema and a version bump tell about) and returns them; it
    refuses q and k that share memory with each other or within themselves (expand()).
    """
    if not inplace and cu_seqlens is None and (
            (inv_freq is not None and cos is None and sin is None)
            or (inv_freq is None and positions is None and cos is not None and sin is not None)):
        out = _fast_rotary(q, k, cos, sin, positions, inv_freq, scale, rotary_dim, rotated_pairs, interleaved,
                           layout, inverse)
        if out is not None:
            return out
    _check_tensor("q", q)
    _check_tensor("k", k)
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q and k must be float32, float16 or bfloat16 (or float64), got {q.dtype}; convert "
                        "them first, e.g. q.to(torch.bfloat16)")
    try:
        scale = float(scale)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if k.device != q.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    packed = cu_seqlens is not None
    want_dim = 3 if packed else 4
    for name, t in (("q", q), ("k", k)):
        if t.dim() != want_dim:
            expected = "[tokens, heads, head_dim] with cu_seqlens" if packed else (
                "[batch, seq, heads, head_dim]" if layout == "bshd" else "[batch, heads, seq, head_dim]")
            raise ValueError(f"{name} must be {expected}, got shape {tuple(t.shape)}")
    if packed:
        q4, k4 = q.unsqueeze(0), k.unsqueeze(0)
    elif layout == "bhsd":
        q4, k4 = q.transpose(1, 2), k.transpose(1, 2)
    else:
        q4, k4 = q, k
    batch, seq, _, head_dim = q4.shape
    for i, what in ((0, "batch"), (1, "seq"), (3, "head_dim")):
        if k4.shape[i] != q4.shape[i]:
            raise ValueError(f"q and k must agree on {what}, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be even and at most {MAX_HEAD_DIM}, got {head_dim}")
    rotary_dim = head_dim if rotary_dim is None else int(rotary_dim)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
    rotated_pairs = rotary_dim // 2 if rotated_pairs is None else int(rotated_pairs)
    if not 0 <= rotated_pairs <= rotary_dim // 2:
        raise ValueError(f"rotated_pairs must be in [0, rotary_dim/2={rotary_dim // 2}], got {rotated_pairs}")
    if inplace and torch.is_grad_enabled():
        for name, t in (("q", q), ("k", k)):
            if t.is_leaf and t.requires_grad:
                raise ValueError(f"inplace=True cannot write into {name}: it is a leaf tensor that requires "
                                 "grad; use inplace=False or pass a non-leaf tensor")
            if not _tracing() and t._base is not None and t._base.is_leaf and t._base.requires_grad:
                raise ValueError(f"inplace=True cannot write into {name}: it is a view of a leaf tensor that "
                                 "requires grad; use inplace=False or pass a non-leaf tensor")

    device = q.device
    if positions is not None:
        _check_tensor("positions", positions, float_only=False)
        if positions.is_floating_point() or positions.dtype == torch.bool or positions.is_complex():
            raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
        if positions.device != device:
            raise ValueError(f"positions must be on q's device {device}, got {positions.device}")
        if packed:
            ok_shapes = [(seq,), (1, seq)]
        else:
            ok_shapes = [(seq,), (batch, seq), (1, seq)]
        if tuple(positions.shape) not in ok_shapes:
            raise ValueError(f"positions must be shaped [seq={seq}] or [batch={batch}, seq={seq}], "
                             f"got {tuple(positions.shape)}")

    if inv_freq is not None:
        if cos is not None or sin is not None:
            raise ValueError("give either cos and sin, or inv_freq, not both")
        _check_tensor("inv_freq", inv_freq)
        if inv_freq.dim() != 1 or inv_freq.shape[0] != rotary_dim // 2:
            raise ValueError(f"inv_freq must be [rotary_dim/2={rotary_dim // 2}], got {tuple(inv_freq.shape)}")
        if inv_freq.device != device:
            raise ValueError(f"inv_freq must be on q's device {device}, got {inv_freq.device}")
        inv_freq = inv_freq.to(torch.float64).contiguous()
        tables = (None, None)
    else:
        if cos is None or sin is None:
            raise ValueError("give cos and sin tables, or inv_freq")
        _check_tensor("cos", cos)
        _check_tensor("sin", sin)
        if cos.shape != sin.shape:
            raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        for name, t in (("cos", cos), ("sin", sin)):
            if t.device != device:
                raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"{name} requires grad, but the op treats cos/sin tables as constants")
        if positions is None:  # one row per token: [seq, R] or [batch, seq, R]
            cos_rows, sin_rows, positions = _per_token_tables(cos, sin, batch, seq, device)
            tables = (_table_half("cos", cos_rows, rotary_dim, interleaved),
                      _table_half("sin", sin_rows, rotary_dim, interleaved))
        else:
            if cos.dim() != 2:
                raise ValueError(f"with positions, cos/sin must be [rows, R] tables indexed by position, "
                                 f"got {tuple(cos.shape)}")
            tables = (_table_half("cos", cos, rotary_dim, interleaved),
                      _table_half("sin", sin, rotary_dim, interleaved))
            if not _tracing() and positions.numel() and positions.device.type != "meta":  # meta: no values
                lo, hi = torch.stack(torch.aminmax(positions)).tolist()  # one host sync on CUDA, not two
                if lo < 0 or hi >= cos.shape[0]:
                    raise ValueError(f"positions must lie in [0, {cos.shape[0]}) (the rows of cos/sin), "
                                     f"got values in [{lo}, {hi}]")

    if inv_freq is not None:
        # default positions are 0..seq-1 (per sequence with cu_seqlens, so at most seq-1 too)
        _check_angles(positions, inv_freq, rotated_pairs, bound=seq - 1 if positions is None else None)
    if positions is None:
        positions = (_positions_from_cu_seqlens(cu_seqlens, seq, device) if packed
                     else torch.arange(seq, device=device))
    elif packed and not _tracing():  # the positions given are used; a cu_seqlens that does not fit is an error
        _positions_from_cu_seqlens(cu_seqlens, seq, device)
    positions = positions.to(torch.int64)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    positions = positions.expand(batch, seq)

    args = (*tables, inv_freq, positions, float(scale), rotary_dim, rotated_pairs, bool(interleaved),
            bool(inverse))
    if inplace:
        records_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if records_grad and torch.compiler.is_compiling():
            # Traced, the write of k through a detached alias (the two nodes below) is not always seen: torch
            # 2.11's AOT autograd gave wrong gradients on views of one buffer. Rotating out of place and copying
            # back is what functionalization turns an in-place op into anyway, and autograd knows copy_ on views.
            q_out, k_out = torch.ops.posenc.rotary(q4, k4, *args)
            q4.copy_(q_out)
            k4.copy_(k_out)
        elif records_grad:
            _RotaryInplace.apply(q4, k4.detach(), *args)
            _RotatedInplace.apply(k4, *args)
        else:
            torch.ops.posenc.rotary_(q4, k4, *args)
        return q, k
    q_out, k_out = torch.ops.posenc.rotary(q4, k4, *args)
    if packed:
        return q_out.squeeze(0), k_out.squeeze(0)
    if layout == "bhsd":
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out
