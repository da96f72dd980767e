"""No input kills the process or comes back silently wrong (issue 14): what the op refuses, and that it still
computes what it accepts. Calls that once aborted the process run in a child process, so that an abort fails
a test instead of ending pytest."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import posenc
from posenc import ops
from posenc.ops import rotary_reference
from helpers import assert_close_to_64, rotate64

HERE = os.path.dirname(os.path.abspath(__file__))
LIMIT = 2**28  # the documented limit on |position * inv_freq| (README, LIMIT)
needs_kernel = pytest.mark.skipif(not ops._HAS_CPU_KERNEL, reason="C++ kernel not built")


def run_in_child(script, timeout=300):
    """Runs `script` (Python source) in a fresh interpreter with tests/ importable. The script prints
    "START <case>" before each case; returns (returncode, stdout, the last case started, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    started = [line[6:] for line in proc.stdout.splitlines() if line.startswith("START ")]
    return proc.returncode, proc.stdout, started[-1] if started else None, proc.stderr


def assert_child_survives(script):
    rc, out, last, err = run_in_child(script)
    assert rc == 0, (f"the child process died (exit code {rc}; a negative code is a signal: -6 SIGABRT) in case "
                     f"{last!r}\nstdout tail:\n{out[-2000:]}\nstderr tail:\n{err[-3000:]}")
    return out


# ------------------------------------------------------------------------------- 1. positions out of tables
@needs_kernel
def test_positions_outside_the_table_raise_and_never_abort():
    """A position outside the cos/sin table aborted the process (float32/64, bfloat16) from inside the
    multiversioned CPU loops; now every dtype, both op forms and compiled apply_rotary raise IndexError/ValueError."""
    out = assert_child_survives(textwrap.dedent("""
        import torch, posenc
        cos, sin = torch.rand(16, 4), torch.rand(16, 4)
        def case(name, fn, want):
            print("START", name, flush=True)
            try:
                fn()
            except want as e:
                print("RAISED", name, type(e).__name__, str(e).splitlines()[0], flush=True)
                return
            print("NO-ERROR", name, flush=True)
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for bad in ([0, 16], [-1, 3], [5, 1 << 40], [-(1 << 62), 0]):
                pos = torch.tensor([bad])
                q, k = torch.randn(1, 2, 3, 8, dtype=dtype), torch.randn(1, 2, 1, 8, dtype=dtype)
                args = (cos, sin, None, pos, 1.0, 8, 4, False, False)
                case(f"rotary {dtype} {bad}", lambda: torch.ops.posenc.rotary(q, k, *args), IndexError)
                case(f"rotary_ {dtype} {bad}", lambda: torch.ops.posenc.rotary_(q, k, *args), IndexError)
        f = torch.compile(lambda q, k, p: posenc.apply_rotary(q, k, cos, sin, p), fullgraph=True, backend="aot_eager")
        for dtype in (torch.float32, torch.bfloat16):
            q, k = torch.randn(1, 2, 3, 8, dtype=dtype), torch.randn(1, 2, 1, 8, dtype=dtype)
            case(f"compiled apply_rotary {dtype}", lambda: f(q, k, torch.tensor([3, 99])), (IndexError, ValueError))
        print("DONE", flush=True)
    """))
    assert "NO-ERROR" not in out, out
    assert out.count("RAISED") == 4 * 4 * 2 + 2 and "DONE" in out, out
    assert "positions must lie in [0, 16)" in out


def torch_check_calls(source):
    """(macro, arguments) of each TORCH_CHECK* call in C++ source, arguments split at top-level commas."""
    calls, i = [], 0
    while (i := source.find("TORCH_CHECK", i)) >= 0:
        name_end = source.index("(", i)
        depth, j, args, start, quote = 0, name_end, [], name_end + 1, None
        while True:
            c = source[j]
            if quote:
                quote = None if c == quote and source[j - 1] != "\\" else quote
            elif c in "\"'":
                quote = c
            elif c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
                if depth == 0:
                    args.append(source[start:j].strip())
                    break
            elif c == "," and depth == 1:
                args.append(source[start:j].strip())
                start = j + 1
            j += 1
        calls.append((source[i:name_end], args))
        i = j
    return calls


def test_check_messages_never_stream_values():
    """A TORCH_CHECK with values after the text formats them through std::ostream inside the extension. On the
    GPU image (a side-installed g++ whose libstdc++ copy is linked into the extension) that stream code ran on
    uninitialised locale data and a refusal crashed the process with SIGSEGV instead of raising, so each check
    passes one message: string literals, or posenc::message(...) (csrc/message.h), which formats without
    streams."""
    root = os.path.join(os.path.dirname(HERE), "csrc")
    checked = 0
    for name in sorted(os.listdir(root)):
        if name == "message.h" or not name.endswith((".h", ".cpp", ".cu")):
            continue
        with open(os.path.join(root, name)) as f:
            for macro, args in torch_check_calls(f.read()):
                checked += 1
                assert len(args) == 2, f"{name}: {macro} with {len(args) - 1} message arguments: {args[1:]}"
                assert args[1].startswith(('"', "message(")), f"{name}: {macro} message {args[1]!r}"
    assert checked >= 25, checked  # the scan found the checks


def test_torch_check_scan_sees_streamed_values():
    calls = torch_check_calls('TORCH_CHECK_VALUE(f(a, b) > 0, "x (", n, ")"); TORCH_CHECK(c, message("y", m));')
    assert calls == [("TORCH_CHECK_VALUE", ["f(a, b) > 0", '"x ("', "n", '")"']),
                     ("TORCH_CHECK", ["c", 'message("y", m)'])]


@needs_kernel
def test_positions_inside_the_table_still_computed():
    cos, sin = torch.rand(16, 4), torch.rand(16, 4)
    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 1, 8)
    args = (cos, sin, None, torch.tensor([[0, 15, 7], [3, 3, 0]]), 1.0, 8, 4, False, False)
    for got, want in zip(torch.ops.posenc.rotary(q, k, *args), rotary_reference(q, k, *args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------- 2. shared memory in place
def _inv(d=16):
    return 10_000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)


def op_args(seq, batch=2, d=16, positions=None):
    positions = torch.arange(seq).expand(batch, seq) if positions is None else positions
    return (None, None, _inv(d), positions, 1.0, d, d // 2, False, False)


def aliased_cases():
    """(name, q, k) that share memory: in place they would be rotated more than once."""
    base = torch.randn(2, 3, 4, 16)
    buf = torch.randn(2, 3, 6, 16)
    wide = torch.randn(2, 3, 4, 24)
    return [
        ("k is q", base, base),
        ("k a head of q", base, base[:, :, 1:2]),
        ("overlapping head ranges", buf[:, :, 0:3], buf[:, :, 2:6]),
        ("k inside q, shifted by channels", wide[..., :16], wide[..., 4:20]),
        ("q heads expanded", base[:, :, :1].expand(-1, -1, 4, -1), torch.randn(2, 3, 1, 16)),
        ("k batch rows expanded", torch.randn(2, 3, 4, 16), base[:1, :, :2].expand(2, -1, -1, -1)),
        ("q seq expanded", base[:, :1].expand(-1, 3, -1, -1), torch.randn(2, 3, 1, 16)),
        ("heads overlapping by stride", torch.randn(200).as_strided((2, 3, 4, 16), (96, 32, 8, 1)),
         torch.randn(2, 3, 1, 16)),
    ]


def separate_cases():
    """(name, q, k) of one buffer that share no element: accepted in place."""
    qkv = torch.randn(2, 3, 3, 4, 16)  # [b, s, 3, heads, d]: a packed projection
    fused = torch.randn(2, 3, (4 + 2 * 1) * 16)  # q | k | v of a fused projection, MQA (one kv head)
    kv = torch.randn(2, 3, 2, 2, 16)
    wide = torch.randn(2, 3, 6, 24)
    t = torch.randn(2, 6, 3, 16)  # bhsd buffer: q heads 0..3, k heads 4..5, seen as bshd
    return [
        ("packed qkv[:, :, 0], qkv[:, :, 1]", qkv[:, :, 0], qkv[:, :, 1]),
        ("packed, k before q", qkv[:, :, 1], qkv[:, :, 0]),
        ("fused projection views, one kv head", fused[..., :64].view(2, 3, 4, 16), fused[..., 64:80].view(2, 3, 1, 16)),
        ("kv[:, :, 0] with a separate q", torch.randn(2, 3, 4, 16), kv[:, :, 0]),
        ("head slices of rows wider than head_dim", wide[:, :, :4, 2:18], wide[:, :, 4:, 2:18]),
        ("bhsd slices of one buffer", t[:, :4].transpose(1, 2), t[:, 4:].transpose(1, 2)),
    ]


# (name, in place, out of place): the compiled op, and the reference's in-place form that serves without it
INPLACE_IMPLS = [("C++ op", lambda q, k, *a: torch.ops.posenc.rotary_(q, k, *a),
                  lambda q, k, *a: torch.ops.posenc.rotary(q, k, *a)),
                 ("reference", ops._reference_inplace, rotary_reference)]


@pytest.mark.parametrize("impl", INPLACE_IMPLS, ids=[i[0] for i in INPLACE_IMPLS])
@pytest.mark.parametrize("case", range(len(aliased_cases())), ids=[c[0] for c in aliased_cases()])
def test_inplace_refuses_shared_memory(case, impl):
    name, q, k = aliased_cases()[case]
    if impl[0] == "C++ op" and not ops._HAS_CPU_KERNEL:
        pytest.skip("C++ kernel not built")
    q0, k0 = q.clone(), k.clone()
    with pytest.raises(ValueError, match=r"share (\(or may share\) )?memory|elements that share memory") as info:
        impl[1](q, k, *op_args(3))
    assert "clone()" in str(info.value)
    assert torch.equal(q, q0) and torch.equal(k, k0), "a refused call must not have written anything"


@pytest.mark.parametrize("case", range(len(aliased_cases())), ids=[c[0] for c in aliased_cases()])
def test_shared_memory_refused_by_apply_and_correct_out_of_place(case):
    name, q, k = aliased_cases()[case]
    enc = posenc.RoPE(16)
    with pytest.raises(ValueError, match="memory"):
        enc.apply(q, k, inplace=True)
    q0, k0 = q.clone(), k.clone()
    q2, k2 = enc.apply(q, k)  # out of place the same inputs are fine
    for x, out in ((q0, q2), (k0, k2)):
        assert_close_to_64(out, rotate64(x, torch.arange(3), enc.inv_freq64), x, torch.float32)


def test_apply_with_the_same_tensor_twice_refused_in_place_both_layouts():
    y = torch.randn(2, 3, 4, 16)
    enc = posenc.RoPE(16)
    for layout in ("bshd", "bhsd"):
        with pytest.raises(ValueError, match="q and k share"):
            enc.apply(y, y, inplace=True, layout=layout)
    with pytest.raises(ValueError, match="q and k share"):
        enc.apply(y[0], y[0], inplace=True, cu_seqlens=torch.tensor([0, 3]))


@pytest.mark.parametrize("impl", INPLACE_IMPLS, ids=[i[0] for i in INPLACE_IMPLS])
def test_inplace_refuses_tables_or_positions_sharing_memory_with_q(impl):
    if impl[0] == "C++ op" and not ops._HAS_CPU_KERNEL:
        pytest.skip("C++ kernel not built")
    q = torch.randn(2, 3, 2, 16)
    table = q.view(-1)[:64].view(8, 8)  # float32 rows inside q
    with pytest.raises(ValueError, match="share memory with q or k"):
        impl[1](q, torch.randn(2, 3, 1, 16), table, table, None, torch.arange(3).expand(2, 3), 1.0, 16, 8, False, False)
    buf = torch.arange(2 * 3 * 2 * 16)  # int64: positions, and (seen as float64) the data of q
    q = buf.view(torch.float64).view(2, 3, 2, 16)
    with pytest.raises(ValueError, match="share memory with q or k"):
        impl[1](q, torch.randn(2, 3, 1, 16, dtype=torch.float64), *op_args(3, positions=buf[:3].expand(2, 3)))


@pytest.mark.parametrize("impl", INPLACE_IMPLS, ids=[i[0] for i in INPLACE_IMPLS])
@pytest.mark.parametrize("case", range(len(separate_cases())), ids=[c[0] for c in separate_cases()])
def test_inplace_accepts_separate_views_of_one_buffer(case, impl):
    name, q, k = separate_cases()[case]
    if impl[0] == "C++ op" and not ops._HAS_CPU_KERNEL:
        pytest.skip("C++ kernel not built")
    args = op_args(3)
    want_q, want_k = impl[2](q, k, *args)  # in place == out of place, bit for bit
    impl[1](q, k, *args)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


# ---------------------------------------------------------------------- 4. in place inside autograd, on views
def _views(kind, x, hq=2, hk=1, d=8, b=2, s=3):
    """q, k of the given kind made from the flat float64 tensor x (which requires grad) by a differentiable op
    first, so that they are non-leaf views. Returns (q, k, apply kwargs)."""
    y = x * 1.0
    if kind == "proj_view":  # q = proj(x).view(b, s, h, d)
        return y[: b * s * hq * d].view(b, s, hq, d), y[b * s * hq * d:].view(b, s, hk, d), {}
    if kind == "packed_qkv":
        qkv = y.view(b, s, hq + 2 * hk, d)
        return qkv[:, :, :hq], qkv[:, :, hq:hq + hk], {}
    if kind == "kv_slice":  # k = kv[:, :, 0]
        kv = y[b * s * hq * d:].repeat(2).view(b, s, 2, hk, d)
        return y[: b * s * hq * d].view(b, s, hq, d), kv[:, :, 0], {}
    if kind == "bhsd":
        return (y[: b * s * hq * d].view(b, hq, s, d), y[b * s * hq * d:].view(b, hk, s, d), {"layout": "bhsd"})
    if kind == "cu_seqlens":
        return (y[: b * s * hq * d].view(b * s, hq, d), y[b * s * hq * d:].view(b * s, hk, d),
                {"cu_seqlens": torch.tensor([0, 2, b * s])})
    raise ValueError(kind)


VIEW_KINDS = ["proj_view", "packed_qkv", "kv_slice", "bhsd", "cu_seqlens"]


def _numel(kind, hq=2, hk=1, d=8, b=2, s=3):
    return b * s * d * (hq + (2 * hk if kind == "packed_qkv" else hk))


@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_inplace_inside_autograd_on_views_gradcheck(kind):
    """In place inside autograd on views failed ("cannot return more than one Tensor"); now its gradients
    pass gradcheck and equal those of the out-of-place path."""
    enc = posenc.PRoPE(8, p=0.5)
    positions = None if kind == "cu_seqlens" else torch.tensor([[5, 900, 3], [0, 1, 2]])

    def f(x, inplace):
        q, k, kw = _views(kind, x)
        q2, k2 = enc.apply(q, k, positions, inplace=inplace, **kw)
        if inplace:
            assert q2 is q and k2 is k
        return q2, k2

    x = torch.randn(_numel(kind), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: f(t, True), (x,))
    weights = [torch.randn(t.shape, dtype=torch.float64) for t in f(x, False)]
    grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(f(x, inplace), weights)), x)[0]
             for inplace in (False, True)]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["packed_qkv", "bhsd"])
def test_inplace_inside_autograd_on_views_under_compile(kind):
    enc = posenc.RoPE(8)

    def f(x, w, inplace):
        q, k, kw = _views(kind, x * w)
        q2, k2 = enc.apply(q, k, inplace=inplace, **kw)
        return (q2 * torch.arange(8.0, dtype=x.dtype)).sum() + (k2.square() * torch.arange(8.0, dtype=x.dtype)).sum()

    x = torch.randn(_numel(kind), dtype=torch.float64)
    w = torch.randn(_numel(kind), dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(f(x, w, False), w)[0]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, True)
    torch.testing.assert_close(loss, f(x, w, False))
    torch.testing.assert_close(torch.autograd.grad(loss, w)[0], want, rtol=0, atol=1e-12)


def test_inplace_on_a_view_of_a_leaf_that_requires_grad_refused():
    leaf = torch.randn(2, 3, 3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="view of a leaf"):
        posenc.RoPE(8).apply(leaf[:, :, :2], leaf[:, :, 2:], inplace=True)
    assert leaf.grad_fn is None


@needs_kernel
def test_inplace_op_moves_version_counters():
    """An in-place write of a tensor that autograd saved must make backward raise, not read the new values:
    the op did not move version counters, so w's gradient below came back silently wrong."""
    w = torch.randn(2, 3, 2, 16, requires_grad=True)
    for rotate in (lambda q, k: torch.ops.posenc.rotary_(q, k, *op_args(3)),
                   lambda q, k: posenc.RoPE(16).apply(q, k, inplace=True)):
        q, k = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 1, 16)
        loss = (q * w).sum()  # saves q for w's gradient
        version = q._version
        rotate(q, k)
        assert q._version > version and k._version > 0
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@needs_kernel
def test_inplace_op_refuses_tensors_that_require_grad():
    """torch.ops.posenc.rotary_ cannot record its write for autograd (apply_rotary(..., inplace=True) does):
    under grad mode it refuses q or k that require grad instead of leaving autograd with stale history."""
    x = torch.randn(2, 3, 2, 16, requires_grad=True)
    for q in (x, x * 1.0):
        with pytest.raises(ValueError, match="requires grad"):
            torch.ops.posenc.rotary_(q, torch.randn(2, 3, 1, 16), *op_args(3))
    with torch.no_grad():
        q = x * 1.0
        torch.ops.posenc.rotary_(q, torch.randn(2, 3, 1, 16), *op_args(3))


# ------------------------------------------------------------------------------- 11. very large positions
def exact_cos_sin(positions, w):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.prec = 200
    angles = [mpmath.mpf(int(m)) * mpmath.mpf(w) for m in positions]
    return (torch.tensor([float(mpmath.cos(a)) for a in angles], dtype=torch.float64),
            torch.tensor([float(mpmath.sin(a)) for a in angles], dtype=torch.float64))


@pytest.mark.parametrize("top", [2**20, 2**26, LIMIT])
def test_angles_accurate_up_to_the_limit(top):
    """cos/sin as the op forms them (the rotation of the unit pair (1, 0)) against an exact angle (mpmath),
    for positions up to the limit: within two float32 rounding steps."""
    g = torch.Generator().manual_seed(top)
    positions = torch.cat([torch.randint(top // 2, top + 1, (200,), generator=g), torch.tensor([top, -top])])
    inv = torch.cat([torch.tensor([1.0, 0.5], dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)])
    q = torch.zeros(1, positions.numel(), 1, 16)
    q[..., :8] = 1.0  # pairs (1, 0): the rotation gives (cos, sin)
    out, _ = posenc.apply_rotary(q, q[:, :, :0], positions=positions, inv_freq=inv)
    for i, w in enumerate(inv.tolist()):
        c, s = exact_cos_sin(positions.tolist(), w)
        err = max((out[0, :, 0, i].double() - c).abs().max().item(), (out[0, :, 0, 8 + i].double() - s).abs().max().item())
        assert err <= 2 * torch.finfo(torch.float32).eps, f"inv_freq {w}: cos/sin error {err:.3g} at positions <= {top}"


LARGE = [("just beyond", [LIMIT + 1]), ("negative", [-LIMIT - 1, 0]), ("2^50", [1 << 50]),
         ("2^62", [1 << 62]), ("int64 min", [-(1 << 63)]), ("int64 max", [(1 << 63) - 1])]


@pytest.mark.parametrize("values", [v for _, v in LARGE], ids=[n for n, _ in LARGE])
def test_angles_beyond_the_limit_refused(values):
    q, k = torch.randn(1, len(values), 2, 16), torch.randn(1, len(values), 1, 16)
    positions = torch.tensor(values)
    with pytest.raises(ValueError, match=r"positions.*2\^28"):
        posenc.RoPE(16).apply(q, k, positions)
    with pytest.raises(ValueError, match=r"positions.*2\^28"):
        posenc.apply_rotary(q, k, positions=positions, inv_freq=_inv())
    if ops._HAS_CPU_KERNEL:  # the op itself on the CPU (torch.compile skips the Python check)
        for op in (torch.ops.posenc.rotary, torch.ops.posenc.rotary_):
            with pytest.raises(ValueError, match=r"positions.*2\^28"):
                op(q, k, *op_args(len(values), 1, positions=positions[None]))


def test_the_limit_scales_with_the_frequencies():
    assert ops.MAX_ANGLE == LIMIT
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 1, 16)
    slow = _inv() * 1e-3  # |position * inv_freq| is what counts
    posenc.apply_rotary(q, k, positions=torch.tensor([LIMIT * 100]), inv_freq=slow)
    with pytest.raises(ValueError, match=r"2\^28"):
        posenc.apply_rotary(q, k, positions=torch.tensor([LIMIT // 100]), inv_freq=_inv() * 1e3)
    for bad in (float("nan"), float("inf")):
        inv = _inv()
        inv[1] = bad
        with pytest.raises(ValueError, match="inv_freq must be finite"):
            posenc.apply_rotary(q, k, positions=torch.tensor([3]), inv_freq=inv)
        if ops._HAS_CPU_KERNEL:
            with pytest.raises(ValueError, match="inv_freq must be finite"):
                torch.ops.posenc.rotary(q, k, None, None, inv, torch.tensor([[3]]), 1.0, 16, 8, False, False)


def test_reference_forms_angles_as_the_kernels_do():
    """The reference reduces the angle with the kernels' roundings (rotary.h: a - 2pi * rint(a * (1/2pi)),
    each step rounded), written out here in Python floats: at 2^40..2^62 a division instead of the
    multiplication moves the reduced angle by multiples of 2pi's rounding, so this tells them apart."""
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(1 << 40, 1 << 62, (1, 400), generator=g)
    inv = torch.tensor([1.0, 0.37, 1e-3], dtype=torch.float64)
    c, s = ops.reference_cos_sin(None, None, inv, positions, 1.0, 3, False, torch.float64)
    two_pi = 2 * math.pi
    for j, w in enumerate(inv.tolist()):
        for i, m in enumerate(positions[0].tolist()):
            a = float(m) * w
            a = a - two_pi * round(a * (1 / two_pi))  # round: ties to even, as rint
            assert (c[0, i, j].item(), s[0, i, j].item()) == (math.cos(a), math.sin(a)), (m, w)


@needs_kernel
@pytest.mark.parametrize("tables", [False, True])
def test_float64_scale_not_rounded_to_float32(tables):
    """(Found by the fuzz test.) float64 data took the scale rounded to float32: errors of 3e-8 against the
    reference, which gradcheck-precision users would not expect."""
    q, k = torch.randn(2, 3, 2, 16, dtype=torch.float64), torch.randn(2, 3, 1, 16, dtype=torch.float64)
    angle = torch.arange(8, dtype=torch.float64)[:, None] * _inv()
    src = (angle.cos().float(), angle.sin().float(), None) if tables else (None, None, _inv())
    args = src + (torch.randint(0, 8, (2, 3)), 0.7, 16, 8, False, True)
    for got, want in zip(torch.ops.posenc.rotary(q, k, *args), rotary_reference(q, k, *args)):
        torch.testing.assert_close(got, want, rtol=4e-16, atol=4e-16)


def test_one_column_tables_of_any_stride_accepted():
    """(Found by the fuzz test.) Interleaved transformers-style tables with rotary_dim=2 give the op one
    column whose stride is not 1 (t[..., ::2] of a row); the op refused them although one column has no
    stride to respect."""
    q, k = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 1, 4)
    cos, sin = torch.tensor([[0.6, 0.6]]), torch.tensor([[0.8, 0.8]])
    q2, k2 = posenc.apply_rotary(q, k, cos, sin, rotary_dim=2, interleaved=True)
    want = q.clone()
    want[..., 0], want[..., 1] = q[..., 0] * 0.6 - q[..., 1] * 0.8, q[..., 1] * 0.6 + q[..., 0] * 0.8
    torch.testing.assert_close(q2, want)


# ---------------------------------------------------------------------------------------- 12. dtypes, cu_seqlens
FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_gets_type_error(dtype):
    q, k = torch.zeros(1, 2, 2, 16, dtype=dtype), torch.zeros(1, 2, 1, 16, dtype=dtype)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        posenc.RoPE(16).apply(q, k)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        posenc.apply_rotary(q, k, inv_freq=_inv())
    if ops._HAS_CPU_KERNEL:
        for op in (torch.ops.posenc.rotary, torch.ops.posenc.rotary_):
            with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
                op(q, k, *op_args(2, 1))


def test_sparse_and_non_finite_scale_refused():
    # (torch.ops.posenc.* with a sparse argument: NotImplementedError from the dispatcher, no kernel runs)
    q, k = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 1, 16)
    with pytest.raises(TypeError, match="q must be a dense"):
        posenc.apply_rotary(q.to_sparse(), k, inv_freq=_inv())
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite"):
            posenc.apply_rotary(q, k, inv_freq=_inv(), scale=scale)


@pytest.mark.parametrize("cu", [[0, 2, 4], [1, 6], [0, 4, 2, 6], [0]], ids=str)
def test_bad_cu_seqlens_refused_even_with_positions(cu):
    """cu_seqlens was ignored when positions were given too; now it is validated either way."""
    q, k = torch.randn(6, 2, 16), torch.randn(6, 1, 16)
    for positions in (None, torch.arange(6)):
        with pytest.raises(ValueError, match="cu_seqlens must"):
            posenc.RoPE(16).apply(q, k, positions, cu_seqlens=torch.tensor(cu))
        with pytest.raises(ValueError, match="cu_seqlens must"):
            posenc.apply_rotary(q, k, positions=positions, inv_freq=_inv(), cu_seqlens=torch.tensor(cu))


def test_good_cu_seqlens_with_positions_uses_the_positions():
    q, k = torch.randn(6, 2, 16), torch.randn(6, 1, 16)
    positions = torch.tensor([7, 8, 9, 0, 1, 2])
    q2, k2 = posenc.apply_rotary(q, k, positions=positions, inv_freq=_inv(), cu_seqlens=torch.tensor([0, 3, 6]))
    assert_close_to_64(q2, rotate64(q[None], positions, _inv())[0], q, torch.float32)
