"""Fuzz: random arguments to posenc.apply_rotary, Encoding.apply and torch.ops.posenc.rotary / rotary_ (shapes,
strides, aliasing, dtypes, layouts, cu_seqlens, tables or inv_freq, positions in and out of range, in place or
not, with autograd or not). A case built valid must return what an independent float64 computation gives (and,
under autograd, its gradients); a case given a fault must raise ValueError, TypeError or IndexError. The cases
run in a child process, so that one which kills the process fails the test and is named. Each case has its
own seed: `python tests/test_fuzz.py SEED CASE` replays one and prints what it did.
"""
import os
import random
import sys

import torch

N_CASES = 1500
LIMIT = 2**28  # the largest |position * inv_freq| the op accepts (README)
FAULT_ERRORS = (ValueError, TypeError, IndexError)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FAULTS = ["table_oob", "angle", "alias", "expand", "dtype", "shape", "cu_seqlens", "positions", "nan_inv",
          "not_tensor", "scale", "grad_op_"]


def test_fuzz_entry_points():
    from conftest import SEED
    from test_op_safety import assert_child_survives
    out = assert_child_survives(f"import test_fuzz; test_fuzz.main({SEED}, {N_CASES})")
    wrong = [line for line in out.splitlines() if line.startswith("WRONG")]
    assert not wrong, f"{len(wrong)} wrong outcomes (replay: python tests/test_fuzz.py {SEED} CASE):\n" + \
        "\n".join(wrong[:20])
    summary = [line for line in out.splitlines() if line.startswith("FUZZ")]
    assert summary and f"ran {N_CASES} cases" in summary[0], out[-2000:]
    print(summary[0])


class Case:
    """One random call: its parameters (`desc`), the call, whether it must raise, the float64 expectation."""

    def __init__(self, seed, index):
        self.rng = rng = random.Random(f"{seed}-{index}")
        self.g = torch.Generator().manual_seed(rng.randrange(2**31))
        self.entry = rng.choice(["apply_rotary", "encoding", "op", "op_"])
        self.op = self.entry.startswith("op")
        self.fault = rng.choice([None] * 12 + FAULTS)
        self.dtype = rng.choice(DTYPES)
        self.layout = "bshd" if self.op else rng.choice(["bshd", "bshd", "bhsd", "packed"])
        self.b = 1 if self.layout == "packed" else rng.randint(1, 3)
        self.s = rng.choice([1, 2, 3, 5, 6])
        self.hq, self.hk = rng.randint(0, 3), rng.randint(0, 2)
        self.d = 2 * rng.choice([1, 2, 3, 4, 8, 12, 32])
        self.rd = 2 * rng.randint(1, self.d // 2)
        self.n = rng.randint(0, self.rd // 2)
        self.interleaved = rng.random() < 0.4
        self.inverse = self.entry != "encoding" and rng.random() < 0.3
        self.scale = 1.0 if self.entry == "encoding" else rng.choice([1.0, 1.0, 0.7, 1.3])
        self.inplace = self.entry == "op_" or (self.entry != "op" and rng.random() < 0.4)
        # (not with the aliasing faults: autograd's inputs are fresh copies)
        self.autograd = not self.op and self.dtype == torch.float64 and self.fault not in ("alias", "expand") \
            and rng.random() < 0.5
        self.tables = self.entry != "encoding" and rng.random() < 0.4
        self.pos_range = rng.choice([10, 1000, 200_000, LIMIT // 2])
        self.extra = {}
        self._build()

    # ------------------------------------------------------------------------------------------ inputs
    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.g).to(self.dtype)

    def _view(self, heads, kind):
        """A [b, s, heads, d] tensor of a stride kind."""
        b, s, d = self.b, self.s, self.d
        if kind == "transposed":  # a bhsd buffer seen as bshd
            return self._randn(b, heads, s, d).transpose(1, 2)
        if kind == "sliced":  # odd channel offset, rows wider than head_dim
            return self._randn(b, s, heads, d + 3)[..., 1:d + 1]
        if kind == "heads_slice":
            return self._randn(b, s, heads + 2, d)[:, :, 1:heads + 1]
        if kind == "batch_stride0":  # rows shared by expand(): fine out of place
            return self._randn(1, s, heads, d).expand(b, -1, -1, -1)
        return self._randn(b, s, heads, d)

    def _build(self):
        rng, f = self.rng, self.fault
        kinds = ["contiguous", "sliced", "heads_slice"] + ["transposed"] * (self.layout != "packed")
        if f == "alias":  # k shares memory with q: refused in place, fine out of place
            self.hq = max(self.hq, 1)
            self.q4 = self._view(self.hq, "contiguous")
            self.k4 = self.q4 if rng.random() < 0.5 else self.q4[:, :, :1]
        elif f == "expand":  # q's heads share memory: refused in place, fine out of place
            self.hq = max(self.hq, 2)
            self.q4 = self._view(1, "contiguous").expand(-1, -1, self.hq, -1)
            self.k4 = self._view(self.hk, "contiguous")
        elif rng.random() < 0.2:  # q and k: head slices of one packed buffer
            buf = self._randn(self.b, self.s, self.hq + self.hk + 1, self.d)
            self.q4, self.k4 = buf[:, :, :self.hq], buf[:, :, self.hq:self.hq + self.hk]
        else:
            stride0 = ["batch_stride0"] if not self.inplace and self.layout != "packed" else []
            self.q4 = self._view(self.hq, rng.choice(kinds + stride0))
            self.k4 = self._view(self.hk, rng.choice(kinds))
        self.hk = self.k4.shape[2]
        self.q0, self.k0 = self.q4.clone(), self.k4.clone()
        self.must_raise = f is not None and not (f in ("alias", "expand") and not self.inplace)

        # positions [b, s] as the op sees them; whether the caller passes them
        b, s = self.b, self.s
        self.positions = torch.randint(0, self.pos_range, (b, 1), generator=self.g) + torch.arange(s)
        if rng.random() < 0.3:
            self.positions = self.positions[:1].expand(b, s)  # shared by the batch rows (stride 0)
        self.pass_positions = self.op or rng.random() < 0.7
        self.cu = None
        if self.layout == "packed":
            cuts = sorted(rng.sample(range(1, s), rng.randint(0, s - 1)))
            bounds = [0] + cuts + [s]
            self.cu = torch.tensor(bounds, dtype=rng.choice([torch.int32, torch.int64]))
            if not self.pass_positions:
                self.positions = torch.cat([torch.arange(e - a) for a, e in zip(bounds[:-1], bounds[1:])])[None]
            if f == "cu_seqlens":
                self.cu = torch.tensor(rng.choice([[0, s + 1], [1, s], [0, s, s - 1] if s > 1 else [0, 2], [s]]))
        elif not self.pass_positions:
            self.positions = torch.arange(s).expand(b, s)

        # angle source
        self.inv = 10_000.0 ** (-torch.arange(0, self.rd, 2, dtype=torch.float64) / self.rd)
        if self.entry == "encoding":
            import posenc
            kind = rng.choice(["rope", "prope", "hope", "nope"])
            opts = {"prope": {"p": 0.5}, "hope": {"context_length": 64}}.get(kind, {})
            self.enc = posenc.get_encoding(kind, head_dim=self.d, rotary_dim=self.rd, interleaved=self.interleaved,
                                           **opts)
            self.inv, self.n, self.scale = self.enc.inv_freq64, self.enc.op_pairs, self.enc.attention_scale
            self.extra["kind"] = kind
        self.per_token = self.tables and self.entry == "apply_rotary" and not self.pass_positions and \
            self.layout != "packed" and f not in ("positions", "table_oob")
        if self.tables and not self.per_token:
            self.pass_positions = True  # tables indexed by position
        if self.per_token:
            self.positions = torch.arange(b * s).view(b, s)
        if self.tables:
            rows = b * s if self.per_token else int(self.positions.max()) + 1 + rng.randint(0, 3)
            if rows > 4096:  # a compact table, positions drawn within it
                rows = rng.randint(1, 4096)
                self.positions = torch.randint(0, rows, (b, s), generator=self.g)
            self.cos = (torch.rand(rows, self.rd // 2, generator=self.g, dtype=torch.float64) * 2 - 1).float()
            self.sin = (torch.rand(rows, self.rd // 2, generator=self.g, dtype=torch.float64) * 2 - 1).float()
        work = b * s * (self.hq + self.hk) > 0
        w_max = float(self.inv[:self.n].abs().max()) if self.n else 0.0

        # faults that need the above; one that does not apply to this case leaves it valid
        def drop():
            self.fault, self.must_raise = None, False

        if f == "cu_seqlens" and self.layout != "packed":
            drop()
        if f == "table_oob":
            if not self.tables or not work or self.op and self.hq + self.hk == 0:
                drop()
            else:
                self.positions = self.positions.clone()
                self.positions.view(-1)[rng.randrange(b * s)] = rng.choice(
                    [-1, self.cos.shape[0], self.cos.shape[0] + 5, 1 << 40, -(1 << 62)])
                self.pass_positions, self.per_token = True, False
        if f == "angle":
            if self.tables or w_max == 0 or not work:
                drop()
            else:
                self.positions = self.positions.clone()
                self.positions.view(-1)[rng.randrange(b * s)] = rng.choice(
                    [int(LIMIT / w_max) + 2, -int(LIMIT / w_max) - 2, 1 << 50, 1 << 62, -(1 << 63)])
                self.pass_positions = True
        if f == "nan_inv":
            if self.tables or self.n == 0 or self.entry == "encoding" or not work:
                drop()
            else:
                self.inv = self.inv.clone()
                self.inv[rng.randrange(self.n)] = rng.choice([float("nan"), float("inf")])
        if f == "scale" and self.entry != "apply_rotary":
            drop()
        if f == "grad_op_" and self.entry != "op_":
            drop()
        if f == "positions":
            p = self.positions
            self.bad_positions = rng.choice([p.float(), p[..., :-1] if s > 1 else p.repeat(1, 2), p[None], p.bool()])
            self.pass_positions = True
        if f == "shape":
            choices = ["k_seq", "big_d"] + (["odd_d"] if not self.op else []) + \
                (["rd", "pairs"] if self.entry != "encoding" else [])
            self.extra["shape"] = rng.choice(choices)

    # ------------------------------------------------------------------------------------------ the call
    def _to_layout(self, x):
        return x.transpose(1, 2) if self.layout == "bhsd" else x[0] if self.layout == "packed" else x

    def _from_layout(self, x):
        return x.transpose(1, 2) if self.layout == "bhsd" else x[None] if self.layout == "packed" else x

    def call(self):
        """Runs the entry point: (q_out, k_out, gradients of q and k or None), in the caller's layout."""
        import posenc
        rng, f = self.rng, self.fault
        q, k = self._to_layout(self.q4), self._to_layout(self.k4)
        if self.autograd:  # non-leaf inputs, so that in place is allowed
            self.leaves = (q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_())
            q, k = self.leaves[0] * 1.0, self.leaves[1] * 1.0
        if f == "grad_op_":
            q = q.detach().clone().requires_grad_() * 1.0
        rd, n, scale = self.rd, self.n, self.scale
        positions = self.positions
        if f == "dtype":
            bad = rng.choice([getattr(torch, "float8_e4m3fn", torch.int32), torch.int32, torch.complex64])
            q, k = q.to(bad), k.to(bad)
        elif f == "shape":
            what = self.extra["shape"]
            if what == "k_seq":
                k = torch.randn(*k.shape[:-3], k.shape[-3] + 1, *k.shape[-2:]) if self.layout != "bhsd" else \
                    torch.randn(*k.shape[:-2], k.shape[-2] + 1, k.shape[-1])
                k = k.to(self.dtype)
            elif what == "big_d":
                q, k = (torch.randn(*x.shape[:-1], 514).to(self.dtype) for x in (q, k))
            elif what == "odd_d":
                q, k = q[..., :-1], k[..., :-1]
            elif what == "rd":
                rd = rng.choice([rd + 1, self.d + 2, 0, -2])
            else:
                n = rd // 2 + rng.randint(1, 3)
        elif f == "positions":
            positions = self.bad_positions
        elif f == "scale":
            scale = rng.choice([float("nan"), float("inf")])
        if f == "not_tensor":
            q = q.tolist()

        if self.op:
            src = (self.cos, self.sin, None) if self.tables else (None, None, self.inv)
            args = src + (positions, scale, rd, n, self.interleaved, self.inverse)
            if self.entry == "op":
                out = torch.ops.posenc.rotary(q, k, *args)
            else:
                torch.ops.posenc.rotary_(q, k, *args)
                out = (q, k)
        else:
            pos_arg = positions if self.pass_positions else None
            if pos_arg is not None and f != "positions" and (pos_arg.stride(0) == 0 or self.b == 1) and \
                    rng.random() < 0.5:
                pos_arg = pos_arg[0]  # [seq]
            kw = dict(layout="bshd" if self.layout == "packed" else self.layout, inplace=self.inplace,
                      cu_seqlens=self.cu)
            if self.entry == "encoding":
                out = self.enc.apply(q, k, pos_arg, **kw)
            else:
                kw.update(scale=scale, rotary_dim=rd, rotated_pairs=n, interleaved=self.interleaved,
                          inverse=self.inverse)
                if not self.tables:
                    kw.update(inv_freq=self.inv, positions=pos_arg)
                elif self.per_token:  # transformers' shape: one row per token, halves duplicated
                    full = (lambda t: t.repeat_interleave(2, -1)) if self.interleaved else \
                        (lambda t: torch.cat([t, t], -1))
                    c, s_ = (full(t.view(self.b, self.s, -1)) for t in (self.cos, self.sin))
                    if self.b == 1 and rng.random() < 0.5:
                        c, s_ = c[0], s_[0]  # [seq, R]
                    kw.update(cos=c, sin=s_)
                else:
                    kw.update(cos=self.cos, sin=self.sin, positions=pos_arg)
                out = posenc.apply_rotary(q, k, **kw)
        if self.inplace and not (out[0] is q and out[1] is k):
            raise AssertionError("in place must return q and k themselves")
        grads = None
        if self.autograd:
            self.weights = [torch.randn(o.shape, dtype=torch.float64, generator=self.g) for o in out]
            loss = sum((o * w).sum() for o, w in zip(out, self.weights))
            grads = torch.autograd.grad(loss, self.leaves, allow_unused=True)
        return out[0], out[1], grads

    # ---------------------------------------------------------------------------------- the expectation
    def expected(self):
        """float64 (q, k) in the caller's layout, their gradients (under autograd), and the largest |angle|."""
        from helpers import rotate64_by
        pos = self.positions.expand(self.b, self.s)
        if self.tables:
            c, s = self.cos.double()[pos], self.sin.double()[pos]
            angle_max = 0.0
        else:
            angle = pos.double()[..., None] * self.inv
            c, s = angle.cos(), angle.sin()
            angle_max = float(angle.abs().max()) if angle.numel() else 0.0
        rot = torch.complex(c * self.scale, s * (-self.scale if self.inverse else self.scale))
        rot[..., self.n:] = 1  # pairs beyond rotated_pairs: untouched
        rot = rot[:, :, None, :]
        outs = [self._to_layout(rotate64_by(x, rot, self.rd, self.interleaved)) for x in (self.q0, self.k0)]
        grads = None
        if self.autograd:  # the transpose of the map: the conjugate rotation
            grads = [self._to_layout(rotate64_by(self._from_layout(w), rot.conj(), self.rd, self.interleaved))
                     for w in self.weights]
        return outs, grads, angle_max

    def describe(self):
        keys = ("entry", "fault", "dtype", "layout", "b", "s", "hq", "hk", "d", "rd", "n", "interleaved",
                "inverse", "scale", "inplace", "autograd", "tables", "per_token", "pos_range", "pass_positions")
        return " ".join(f"{k}={getattr(self, k)}" for k in keys) + "".join(f" {k}={v}" for k, v in self.extra.items())


def within_bound(out, want, x, dtype, rd, interleaved, scale, angle_max):
    """None if |out - want| <= (2 rounding steps of dtype + the op's angle error, 2.6e-16 * |angle|) times the
    pair's |x1| + |x2| (and the scale); else what is wrong."""
    from helpers import pair_magnitude
    if tuple(out.shape) != tuple(want.shape) or out.dtype != dtype:
        return f"got {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(want.shape)}"
    bound = (2 * torch.finfo(dtype).eps + 3e-16 * angle_max) * max(1.0, abs(scale)) * \
        pair_magnitude(x, rd, interleaved) + 1e-300
    err = (out.detach().double() - want).abs()
    if not bool((err <= bound).all()):
        return f"error {err.max().item():.3g}, {(err / bound).max().item():.3g} times the bound"
    return None


def run(seed, index, verbose=False):
    case = Case(seed, index)
    print("START", index, case.describe(), flush=True)
    try:
        q_out, k_out, grads = case.call()
    except Exception as e:  # noqa: BLE001: which exception, if any, is the finding
        if verbose:
            print(f"raised {type(e).__name__}: {e}")
        dispatcher_arg_error = case.fault == "not_tensor" and case.op and isinstance(e, RuntimeError)
        if case.must_raise and (isinstance(e, FAULT_ERRORS) or dispatcher_arg_error):
            return "refused"
        return f"WRONG case {index}: raised {type(e).__name__}: {str(e)[:300]} | {case.describe()}"
    if case.must_raise:
        return f"WRONG case {index}: the fault was accepted | {case.describe()}"
    outs, want_grads, angle_max = case.expected()
    originals = [case._to_layout(x) for x in (case.q0, case.k0)]
    for name, got, want, x in zip("qk", (q_out, k_out), outs, originals):
        problem = within_bound(got, want, x, case.dtype, case.rd, case.interleaved, case.scale, angle_max)
        if problem:
            return f"WRONG case {index}: {name}: {problem} | {case.describe()}"
    if case.autograd:
        for name, got, want in zip("qk", grads, want_grads):
            got = torch.zeros_like(want) if got is None else got
            problem = within_bound(got, want, want, torch.float64, case.rd, case.interleaved, case.scale, angle_max)
            if problem:
                return f"WRONG case {index}: gradient of {name}: {problem} | {case.describe()}"
    return "ok"


def main(seed, n_cases, only=None):
    import warnings
    warnings.simplefilter("ignore")  # (encodings that rotate no pair say so)
    counts = {"ok": 0, "refused": 0, "wrong": 0}
    for index in range(n_cases) if only is None else [only]:
        result = run(seed, index, verbose=only is not None)
        if result.startswith("WRONG"):
            counts["wrong"] += 1
            print(result, flush=True)
        else:
            counts[result] += 1
    print(f"FUZZ seed {seed}: ran {sum(counts.values())} cases: {counts['ok']} matched the float64 computation, "
          f"{counts['refused']} raised as they should, {counts['wrong']} wrong", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(int(sys.argv[1]), None, only=int(sys.argv[2]))
