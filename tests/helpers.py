"""Independent float64 computations the tests compare against (written without posenc's code paths), and
what test_ops.py and test_cuda.py share: the devices a property runs on, the op's argument builder and the
property checks."""
import math

import pytest
import torch


def _cuda_skip_reason():
    """Why the "cuda" parametrisation cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    import posenc
    if not posenc.ops._HAS_CUDA_KERNEL:  # (test_cuda.py fails loudly for this: a GPU build without its kernel)
        return f"the CUDA kernel is not built: {posenc.backend('cuda')}"
    return None


# One test body per property, run on each device: `@pytest.mark.parametrize("device", DEVICES)`. (A
# parametrisation, not a fixture: hypothesis refuses function-scoped fixtures in @given tests.)
_CUDA_SKIP = _cuda_skip_reason()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.skip(reason=_CUDA_SKIP)] if _CUDA_SKIP else [])]


def default_inv_freq(rotary_dim, base):
    return base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def expected_inv_freq(kind, head_dim, base=10_000.0, rotary_dim=None, p=None, context_length=None):
    """inv_freq by the encodings' definitions (the README's table), written from scratch."""
    rotary_dim = rotary_dim or head_dim
    inv = default_inv_freq(rotary_dim, base)
    if kind == "nope":
        inv = torch.zeros_like(inv)
    elif kind == "prope":
        inv[int(p * rotary_dim // 2):] = 0
    elif kind == "hope":
        wavelength = 2 * math.pi / inv
        inv[wavelength > context_length] = 0
    return inv


def masked_inv_freq(rotary_dim, pairs, base=10_000.0):
    """float64 inverse frequencies with only the first `pairs` non-zero (what rotated_pairs means)."""
    inv = default_inv_freq(rotary_dim, base)
    inv[pairs:] = 0
    return inv


def op_args(head_dim=64, pairs=None, rotary_dim=None, tables=False, batch=2, seq=5, scale=1.0,
            interleaved=False, inverse=False, large=False, device="cpu"):
    """The arguments of posenc::rotary after q and k: float64 inv_freq, or (tables) float32 cos/sin rows up to
    the largest position; positions [batch, seq], counting up from a random start per row (up to 1.5e5 when
    large, else 100)."""
    rotary_dim = rotary_dim or head_dim
    pairs = rotary_dim // 2 if pairs is None else pairs
    positions = torch.randint(0, 150_000 if large else 100, (batch, 1)) + torch.arange(seq)
    inv = default_inv_freq(rotary_dim, 10_000.0)
    if tables:
        rows = int(positions.max()) + 1
        angle = torch.arange(rows, dtype=torch.float64)[:, None] * inv
        cos, sin, inv = angle.cos().float().to(device), angle.sin().float().to(device), None
    else:
        cos = sin = None
        inv = inv.to(device)
    return (cos, sin, inv, positions.to(device), scale, rotary_dim, pairs, interleaved, inverse)


def rotated_mask(head_dim, rotary_dim, pairs, interleaved):
    """bool [head_dim]: the channels that rotate (the only ones an in-place call may touch)."""
    m = torch.zeros(head_dim, dtype=torch.bool)
    if interleaved:
        m[: 2 * pairs] = True
    else:
        m[:pairs] = True
        m[rotary_dim // 2: rotary_dim // 2 + pairs] = True
    return m


def rotary_configs(head_dim):
    """(name, rotary_dim, rotated_pairs, (q_heads, kv_heads)): full, partial rotary, a HoPE-like cut that
    ends inside a 16-byte chunk, and partial rotary with an odd cut; GQA and MQA head counts."""
    half = head_dim // 2
    partial = max(2, (head_dim // 2) // 2 * 2)
    three_q = max(2, (3 * head_dim // 4) // 2 * 2)
    return [
        ("full", head_dim, half, (8, 2)),
        ("partial", partial, partial // 2, (4, 1)),
        ("cut", head_dim, max(1, int(0.72 * half)), (6, 2)),
        ("partial_cut", three_q, max(1, three_q // 2 - 3), (3, 1)),
    ]


def rotate64(x, positions, inv_freq, rotary_dim=None, interleaved=False, layout="bshd", scale=1.0):
    """Rotate x (any float dtype) in float64 with complex arithmetic: z_i * exp(i * m * w_i)."""
    batch, seq = (x.shape[0], x.shape[1 if layout == "bshd" else 2])
    pos = torch.as_tensor(positions).to(torch.float64).expand(batch, seq)
    angle = pos[..., None, None] * inv_freq  # [b, s, 1, pairs]
    return rotate64_by(x, torch.polar(torch.full_like(angle, float(scale)), angle), rotary_dim, interleaved, layout)


def rotate64_by(x, rot, rotary_dim=None, interleaved=False, layout="bshd"):
    """Multiply each pair z_i = (x1, x2) of x by the complex float64 rot [batch, seq, 1, pairs]."""
    x = x.to(torch.float64).cpu()
    if layout == "bhsd":
        x = x.transpose(1, 2)
    rotary_dim = rotary_dim or x.shape[-1]
    rot = rot.cpu()
    part = x[..., :rotary_dim]
    if interleaved:
        z = torch.complex(part[..., 0::2], part[..., 1::2]) * rot
        rotated = torch.stack([z.real, z.imag], -1).flatten(-2)
    else:
        half = rotary_dim // 2
        z = torch.complex(part[..., :half], part[..., half:]) * rot
        rotated = torch.cat([z.real, z.imag], -1)
    out = torch.cat([rotated, x[..., rotary_dim:]], -1)
    return out.transpose(1, 2) if layout == "bhsd" else out


def pair_magnitude(x, rotary_dim=None, interleaved=False):
    """|x_i| + |partner of x_i| per channel (just |x_i| outside the rotary span), in float64."""
    x = x.to(torch.float64).abs()
    rotary_dim = rotary_dim or x.shape[-1]
    part = x[..., :rotary_dim]
    if interleaved:
        partner = part.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        partner = part.roll(rotary_dim // 2, -1)
    return torch.cat([part + partner, x[..., rotary_dim:]], -1)


def assert_close_to_64(out, expected64, x, dtype, rotary_dim=None, interleaved=False, layout="bshd", factor=2.0):
    """|out - exact| <= factor rounding steps (eps) of dtype, relative to the pair's magnitude |x1| + |x2|
    (which bounds |out|; float32 arithmetic and the output rounding both err relative to it)."""
    eps = torch.finfo(dtype).eps
    bound = factor * eps * pair_magnitude(x, rotary_dim, interleaved) + 1e-300
    err = (out.to(torch.float64) - expected64).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, (f"error {err.max().item():.3g} exceeds {factor} rounding steps of {dtype} "
                          f"(worst ratio {worst:.3g})")


def random_rotation_strategies():
    """hypothesis strategies for check_random_rotation (shapes, strides, dtypes, angle sources)."""
    from hypothesis import strategies as st
    return dict(
        batch=st.integers(1, 3), seq=st.integers(1, 6), hq=st.integers(1, 5), hk=st.integers(1, 3),
        half=st.integers(1, 40), rot_frac=st.floats(0.1, 1.0), pair_frac=st.floats(0.0, 1.0),
        interleaved=st.booleans(), transpose=st.booleans(), sliced=st.booleans(), inplace=st.booleans(),
        dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), tables=st.booleans(),
        max_pos=st.sampled_from([10, 1000, 300_000]), seed=st.integers(0, 2**31 - 1),
    )


def rotate64_tables(x, c, s, rotary_dim=None, interleaved=False, layout="bshd"):
    """Independent float64 rotation by given cos/sin values c, s [batch, seq, rotary_dim/2] (e.g. the float32
    table rows an op was given)."""
    rot = torch.complex(c.double().cpu(), s.double().cpu())[:, :, None, :]
    return rotate64_by(x, rot, rotary_dim, interleaved, layout)


def check_random_rotation(device, batch, seq, hq, hk, half, rot_frac, pair_frac, interleaved, transpose, sliced,
                          inplace, dtype, tables, max_pos, seed):
    """One property-test case on `device`: apply_rotary on random (possibly transposed / sliced) q and k equals
    an independent float64 rotation; out of place leaves the inputs alone, in place returns them."""
    import posenc
    head_dim = 2 * half
    rotary_dim = max(2, 2 * int(half * rot_frac))
    pairs = int(rotary_dim // 2 * pair_frac)
    gen = torch.Generator().manual_seed(seed)

    def make(heads):
        if transpose:  # a bhsd-contiguous buffer seen as bshd
            x = torch.randn(batch, heads, seq, head_dim + 2 * sliced, generator=gen).transpose(1, 2)
        else:
            x = torch.randn(batch, seq, heads, head_dim + 2 * sliced, generator=gen)
        x = x.to(dtype).to(device)
        return x[..., 1:head_dim + 1] if sliced else x  # sliced: odd offset, non-unit row stride (scalar path)

    q, k = make(hq), make(hk)
    positions = torch.randint(0, max_pos, (batch, seq), generator=gen)
    inv = 10_000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    inv[pairs:] = 0
    kwargs = dict(rotary_dim=rotary_dim, rotated_pairs=pairs, interleaved=interleaved, inplace=inplace)
    if tables:
        angle = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv
        cos, sin = angle.cos().float(), angle.sin().float()
        src = dict(cos=cos.to(device), sin=sin.to(device))
    else:
        src = dict(inv_freq=inv.to(device))
    q0, k0 = q.clone(), k.clone()
    q2, k2 = posenc.apply_rotary(q, k, positions=positions.to(device), **src, **kwargs)
    if inplace:
        assert q2 is q and k2 is k
    else:
        assert torch.equal(q, q0) and torch.equal(k, k0)
    for x, out in ((q0, q2), (k0, k2)):
        if tables:  # expected from the float32 table values the op was given
            want = rotate64_tables(x, cos[positions], sin[positions], rotary_dim, interleaved)
        else:
            want = rotate64(x.cpu(), positions, inv, rotary_dim, interleaved)
        assert_close_to_64(out.cpu(), want, x.cpu(), dtype, rotary_dim, interleaved)


def check_packed_varlen(enc, device):
    """Packed sequences (cu_seqlens) give exactly what each sequence gives on its own."""
    lengths = [3, 1, 6]
    q = torch.randn(sum(lengths), 4, enc.head_dim, device=device)
    k = torch.randn(sum(lengths), 2, enc.head_dim, device=device)
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32, device=device)
    q2, k2 = enc.apply(q, k, cu_seqlens=cu)
    start = 0
    for n in lengths:
        qs, ks = enc.apply(q[None, start:start + n], k[None, start:start + n])
        assert torch.equal(q2[start:start + n], qs[0]) and torch.equal(k2[start:start + n], ks[0])
        start += n
