"""Independent float64 computations the tests compare against (written without posenc's code paths)."""
import math

import torch


def default_inv_freq(rotary_dim, base):
    return base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def expected_inv_freq(kind, head_dim, base=10_000.0, rotary_dim=None, p=None, context_length=None):
    """inv_freq per the DESIGN's definitions, from scratch."""
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
