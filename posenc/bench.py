"""Rotary microbenchmarks: posenc's fused op against the floor (a copy) and the kernels people use today.

    rows = posenc.bench.run(device="cuda")          # the "gpu" preset; device="cpu": the "cpu" preset
    print(posenc.bench.format_table(rows))
    posenc.bench.write_json(rows, "bench.json"); posenc.bench.plot(rows, "bench.png")

Every case (shape x encoding x pass x dtype) times these methods in the same run, on the same data:
  copy        q.clone(); k.clone()                              the floor: every byte read and written once
  posenc      encoding.apply(q, k, positions) (inplace=True for the "fwd_inplace" pass): angles from the
              float64 frequencies, cos/sin computed in the kernel
  posenc_tables  the same op given float32 cos/sin tables (a row per position, built once) to read instead
  posenc_hf   the op as a patched Hugging Face layer calls it: apply_rotary on bhsd views with transformers'
              per-token cos/sin in the model dtype (the hf_eager inputs), read as given
  hf_eager    transformers' apply_rotary_pos_emb (modeling_llama) on bhsd views, with cos/sin precomputed
              as the model dtype from the encoding (frequency-0 pairs get cos=1, sin=0: same function)
  hf_compile  torch.compile of the same function
  liger       liger-kernel's liger_rotary_pos_emb (rotates in place), if liger_kernel imports
  flash_attn  flash_attn.layers.rotary.apply_rotary_emb (one call for q, one for k), if flash_attn imports
  native_mul  q * 1.0 and k * 1.0 (fwd+bwd only): no rotation, a native elementwise op over the same bytes,
              through the same autograd.grad call; its eager column is what PyTorch's own dispatch and autograd
              cost per fwd+bwd, the eager floor of any op (the check column says "floor")
Passes: "fwd" (out of place), "fwd_inplace" (posenc, liger and flash_attn in place; transformers has no
in-place form and runs out of place), "fwd+bwd" (forward and torch.autograd.grad through autograd),
"decode" (forward with random per-row positions, meant for S=1).

Before timing, each method's output on fresh inputs is compared with posenc's (relative L2 error within 8
rounding steps of the dtype; the "check" column). GPU times are CUDA-event medians over `repeats` replays of
a CUDA graph holding `iters` calls (launch gaps out, as in a captured decode loop; "us", "x_copy"), and,
next to them, of the same `iters` calls issued from Python without a graph ("us_eager", "x_copy_eager"), which is
what an eager model pays: the host time per call shows there wherever it exceeds the kernel's time. Where a
method cannot be captured, "us" is its eager time (timing "eager"). CPU times are time.perf_counter medians of
single calls (eager by nature: no eager columns). GB/s counts the bytes a copy of q and k moves (read + write; twice that for fwd+bwd, whose floor
row is still one copy), so it is the copy-equivalent bandwidth even when the in-place op skips channels.
x_copy = time / time of the copy of the same case.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Callable

import torch

from . import io as _io
from .encodings import Encoding, get_encoding
from .specs import EncodingSpec, parse_spec

__all__ = ["Shape", "Case", "E2EModel", "E2E_PRESETS", "run_e2e", "BENCH_PRESETS", "PRESETS", "METHODS", "PASSES",
           "run", "format_table", "write_json", "plot"]

METHODS = ("copy", "posenc", "posenc_tables", "posenc_hf", "hf_eager", "hf_compile", "liger", "flash_attn",
           "native_mul")
PASSES = ("fwd", "fwd_inplace", "fwd+bwd", "decode")
_PASS_ALIASES = {"forward": "fwd", "fwd": "fwd", "inplace": "fwd_inplace", "fwd_inplace": "fwd_inplace",
                 "forward_inplace": "fwd_inplace", "backward": "fwd+bwd", "bwd": "fwd+bwd", "fwd+bwd": "fwd+bwd",
                 "fwd_bwd": "fwd+bwd", "train": "fwd+bwd", "decode": "decode"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Shape:
    """q [batch, seq, q_heads, head_dim] and k [batch, seq, kv_heads, head_dim] (bshd, contiguous)."""
    name: str
    batch: int
    seq: int
    q_heads: int
    kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape with one encoding ("rope", "prope:P", "hope:L", "nope") and the passes to time."""
    shape: Shape
    encoding: str = "rope"
    passes: tuple = ("fwd",)


LLAMA_8B = Shape("llama8b-b4s4096", 4, 4096, 32, 8, 128)
LLAMA_8B_LONG = Shape("llama8b-b1s32768", 1, 32768, 32, 8, 128)
GEMMA = Shape("gemma-b4s4096", 4, 4096, 8, 1, 256)
GEMMA4_GLOBAL = Shape("gemma4global-b4s4096", 4, 4096, 8, 1, 512)
DECODE = Shape("decode-b64", 64, 1, 32, 8, 128)
CPU_LLAMA = Shape("cpu-llama-s2048", 1, 2048, 32, 8, 128)
TINY = Shape("tiny", 1, 16, 4, 2, 64)

_LLAMA = [Case(LLAMA_8B, "rope", ("fwd", "fwd+bwd", "fwd_inplace")), Case(LLAMA_8B_LONG, "rope", ("fwd",)),
          Case(LLAMA_8B, "hope:4096", ("fwd_inplace",)), Case(LLAMA_8B, "prope:0.75", ("fwd_inplace",))]
_GEMMA = [Case(GEMMA, "rope", ("fwd", "fwd+bwd", "fwd_inplace"))]
_GEMMA4 = [Case(GEMMA4_GLOBAL, "prope:0.25", ("fwd_inplace", "fwd"))]
_DECODE = [Case(DECODE, "rope", ("decode",))]
BF16 = ["bfloat16"]

# Named runs: keyword arguments for run(), which takes a name as `shapes` (`posenc bench --preset NAME`).
BENCH_PRESETS = {
    "gpu": {"shapes": _LLAMA + _GEMMA + _GEMMA4 + _DECODE, "dtypes": BF16},  # default on CUDA
    "llama-8b": {"shapes": _LLAMA, "dtypes": BF16},
    "gemma": {"shapes": _GEMMA, "dtypes": BF16},
    "gemma4-global": {"shapes": _GEMMA4, "dtypes": BF16},
    "decode": {"shapes": _DECODE, "dtypes": BF16},
    # default on CPU: 32 q / 8 kv heads, D=128, S=2048, float32 and bfloat16 (under a minute on 2 cores)
    "cpu": {"shapes": [Case(CPU_LLAMA, "rope", ("fwd",))], "dtypes": ["float32", "bfloat16"],
            "methods": ["copy", "posenc", "posenc_tables", "posenc_hf", "hf_eager", "hf_compile"]},
    "tiny": {"shapes": [Case(TINY, "rope", ("fwd",))], "dtypes": ["float32"],
             "methods": ["copy", "posenc", "hf_eager"], "warmup": 1, "iters": 3},
}
PRESETS = BENCH_PRESETS  # the earlier name


# ------------------------------------------------------------------------------------------ arguments
def _dtype(d):
    if isinstance(d, torch.dtype):
        return d
    if isinstance(d, str) and d.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[d.lower().replace("torch.", "")]
    raise ValueError(f"dtypes: unknown dtype {d!r}; expected one of float32, float16, bfloat16")


def _pass(p):
    key = str(p).lower()
    if key not in _PASS_ALIASES:
        raise ValueError(f"passes: unknown pass {p!r}; expected one of {', '.join(PASSES)}")
    return _PASS_ALIASES[key]


def _shape(s) -> Shape:
    if isinstance(s, Shape):
        return s
    if isinstance(s, dict):
        return Shape(**{"name": "custom", **s})
    if isinstance(s, (tuple, list)) and len(s) == 5 and all(isinstance(v, int) for v in s):
        b, t, hq, hk, d = s
        return Shape(f"b{b}s{t}h{hq}/{hk}d{d}", b, t, hq, hk, d)
    raise TypeError(f"shapes: expected a preset name, Shape, Case, dict or (B, S, Hq, Hk, D), got {s!r}")


def _cases(device, shapes, encodings, passes):
    """The list of Cases to run, plus preset defaults (dtypes, methods) when a preset was named."""
    extra = {}
    if shapes is None:
        shapes = "cpu" if device == "cpu" else "gpu"
    if isinstance(shapes, (str, Shape, Case)):
        shapes = [shapes]
    cases = []
    for s in shapes:
        if isinstance(s, str):
            if s not in BENCH_PRESETS:
                raise ValueError(f"shapes: unknown preset {s!r}; expected one of {', '.join(BENCH_PRESETS)}")
            preset = BENCH_PRESETS[s]
            for key in ("dtypes", "methods", "warmup", "iters"):
                if key in preset:
                    extra.setdefault(key, preset[key])
            cases += list(preset["shapes"])
        elif isinstance(s, Case):
            cases.append(s)
        else:
            shape = _shape(s)
            default = ("decode",) if shape.seq == 1 else ("fwd",)
            for enc in encodings or ["rope"]:
                cases.append(Case(shape, enc, tuple(passes or default)))
    specs = [_spec(c.encoding) for c in cases]  # a bad encoding is refused before any timing
    if encodings:  # the cases of these encodings; a value given replaces the case's
        wanted = {spec.name: spec for spec in map(_spec, encodings)}
        cases = [c if not wanted[s.name].options else dataclasses.replace(c, encoding=str(wanted[s.name]))
                 for c, s in zip(cases, specs) if s.name in wanted]
    if passes:
        wanted = [_pass(p) for p in passes]
        cases = [dataclasses.replace(c, passes=tuple(p for p in c.passes if p in wanted) or
                                     tuple(wanted)) for c in cases]
    if not cases:
        raise ValueError("nothing to run: no case matches the given shapes/encodings/passes")
    return cases, extra


def _spec(text: str) -> EncodingSpec:
    """A case's encoding: an encoding spec (posenc.specs) naming one of posenc's encodings, for every layer."""
    spec = parse_spec(text)
    if spec.name == "original" or spec.layers is not None:
        raise ValueError(f"encodings: the benchmark times rope, prope[:p], hope[:L] or nope, got {text!r}")
    return spec


def _encoding(text: str, head_dim: int) -> Encoding:
    spec = _spec(text)
    return get_encoding(spec.name, head_dim=head_dim, **spec.options)


# ------------------------------------------------------------------------------------------- methods
def _hf_apply():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    return apply_rotary_pos_emb


_COMPILED = {}


def _hf_compiled():
    if "hf" not in _COMPILED:
        import torch._dynamo
        for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                    "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 256))
        _COMPILED["hf"] = torch.compile(_hf_apply(), fullgraph=True, dynamic=False)
    return _COMPILED["hf"]


def _liger():
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        return liger_rotary_pos_emb
    except Exception:
        from liger_kernel.ops.rope import LigerRopeFunction
        return LigerRopeFunction.apply


def _flash():
    from flash_attn.layers.rotary import apply_rotary_emb
    return apply_rotary_emb


def _available(method, device):
    """None if the method can run here, else the reason it cannot."""
    try:
        if method in ("hf_eager", "hf_compile"):
            _hf_apply()
        elif method == "liger":
            if device != "cuda":
                return "GPU only"
            _liger()
        elif method == "flash_attn":
            if device != "cuda":
                return "GPU only"
            _flash()
    except Exception as exc:  # ImportError, or a broken install
        return f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    return None


class _Inputs:
    """q, k (bshd, contiguous), positions, and the cos/sin tables the table-based methods use."""

    def __init__(self, shape, dtype, device, enc, pass_, grad=False):
        B, S, D = shape.batch, shape.seq, shape.head_dim
        self.q = torch.randn(B, S, shape.q_heads, D, device=device, dtype=dtype, requires_grad=grad)
        self.k = torch.randn(B, S, shape.kv_heads, D, device=device, dtype=dtype, requires_grad=grad)
        if pass_ == "decode":
            self.positions = torch.randint(0, 100_000, (B, S), device=device) + torch.arange(S, device=device)
        else:
            self.positions = torch.arange(S, device=device).expand(B, S)
        # as transformers builds them: [1, S, D] from position_ids shared by the batch, [B, S, D] per row
        rows = self.positions if pass_ == "decode" else self.positions[:1]
        self.cos, self.sin = enc.cos_sin(rows, dtype=dtype)
        self.grads = None
        if grad:
            self.grads = (torch.randn_like(self.q), torch.randn_like(self.k))


def _fresh(x: _Inputs, grad: bool) -> _Inputs:
    """A copy of x with cloned q and k (leaves, requiring grad for fwd+bwd)."""
    y = _Inputs.__new__(_Inputs)
    y.__dict__.update(x.__dict__)
    y.q = x.q.detach().clone().requires_grad_(grad)
    y.k = x.k.detach().clone().requires_grad_(grad)
    return y


def _make_fn(method, pass_, enc, x: _Inputs):
    """A zero-argument callable doing one step of `method`; returns (q_out, k_out) in bshd."""
    inplace = pass_ == "fwd_inplace"
    q, k, pos, cos, sin = x.q, x.k, x.positions, x.cos, x.sin

    if method == "copy":
        def fwd():
            return q.clone(), k.clone()
        return fwd  # the floor, the same for every pass
    if method == "posenc":
        def fwd():
            return enc.apply(q, k, pos, inplace=inplace)
    elif method == "posenc_tables":  # the same op reading float32 cos/sin tables by position: no trig
        from posenc.ops import apply_rotary
        table_pos = torch.arange(int(pos.max()) + 1, device=q.device)
        # attention scale included; built once, not per call (the op reads the first half of each row in place)
        c, s = enc.cos_sin(table_pos, dtype=torch.float32)

        def fwd():
            return apply_rotary(q, k, c, s, pos, rotary_dim=enc.rotary_dim, rotated_pairs=enc.op_pairs,
                                interleaved=enc.interleaved, inplace=inplace)
    elif method == "posenc_hf":
        from posenc.ops import apply_rotary

        def fwd():
            qo, ko = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, rotary_dim=enc.rotary_dim,
                                  rotated_pairs=enc.op_pairs, interleaved=enc.interleaved, layout="bhsd",
                                  inplace=inplace)
            return qo.transpose(1, 2), ko.transpose(1, 2)
    elif method in ("hf_eager", "hf_compile"):
        fn = _hf_apply() if method == "hf_eager" else _hf_compiled()

        def fwd():
            qo, ko = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # bhsd views, as transformers passes
            return qo.transpose(1, 2), ko.transpose(1, 2)
    elif method == "liger":
        fn = _liger()

        def fwd():
            qo, ko = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # rotates q and k in place
            return qo.transpose(1, 2), ko.transpose(1, 2)
    elif method == "native_mul":
        def fwd():
            return q * 1.0, k * 1.0
    elif method == "flash_attn":
        fn = _flash()
        half = enc.rotary_dim // 2
        if pass_ == "decode":  # per-row positions: a table over positions, offsets per row
            rows = int(pos.max()) + 1
            table_pos = torch.arange(rows, device=q.device)
            c, s = enc.cos_sin(table_pos, dtype=q.dtype)
            offsets = pos[:, 0].to(torch.int32).contiguous()
        else:
            c, s = cos[0], sin[0]
            offsets = 0
        c, s = c[..., :half].contiguous(), s[..., :half].contiguous()

        def fwd():
            return (fn(q, c, s, interleaved=False, inplace=inplace, seqlen_offsets=offsets),
                    fn(k, c, s, interleaved=False, inplace=inplace, seqlen_offsets=offsets))
    else:
        raise ValueError(f"methods: unknown method {method!r}; expected one of {', '.join(METHODS)}")

    if pass_ != "fwd+bwd":
        return fwd

    def fwd_bwd():
        qo, ko = fwd()
        return torch.autograd.grad((qo, ko), (q, k), x.grads)  # no accumulation into .grad
    return fwd_bwd


# -------------------------------------------------------------------------------------------- timing
def _event_median(step, iters, repeats):
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def _time_cuda(fn, warmup, iters, repeats):
    """(graph µs, eager µs, mode): CUDA-event medians per call of `iters` calls replayed from a CUDA graph
    (launch gaps out; None where the method cannot be captured) and of the same calls issued from Python
    (what an eager model pays: host time per call shows wherever it exceeds the kernel's)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and compilation) off the capture
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def eager():
        for _ in range(iters):
            fn()
    eager()
    torch.cuda.synchronize()
    eager_us = _event_median(eager, iters, repeats)
    graph_us, mode, graph = None, "graph", None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        graph_us = _event_median(graph.replay, iters, repeats)
    except Exception:
        mode = "eager"
        torch.cuda.synchronize()
    del graph
    return graph_us, eager_us, mode


def _time_cpu(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, "perf_counter"


def _rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"


def _versions():
    import posenc
    v = {"torch": torch.__version__, "posenc": getattr(posenc, "__version__", "?")}
    try:
        import transformers
        v["transformers"] = transformers.__version__
    except Exception:
        v["transformers"] = None
    try:
        import importlib.metadata as md
        v["liger_kernel"] = md.version("liger-kernel")
    except Exception:
        v["liger_kernel"] = None
    return v


# ----------------------------------------------------------------------------------------------- run
def run(device: str = "cpu", shapes=None, dtypes=None, encodings=None, methods=None, passes=None,
        warmup: int | None = None, iters: int | None = None, progress: Callable | None = None,
        repeats: int = 5) -> list[dict]:
    """Times every case x dtype x method; returns one dict per row (see the module docstring).

    shapes: a preset name (see BENCH_PRESETS), or a list of preset names, Case, Shape, dicts of Shape fields or
    (B, S, Hq, Hk, D) tuples; default: the "cpu" preset on CPU, the "gpu" preset on CUDA. encodings
    ("rope", "prope[:p]", "hope[:L]", "nope") and passes filter a preset's cases (or, for plain shapes,
    are crossed with them). dtypes default to the preset's (bfloat16 on GPU; float32 and bfloat16 on CPU).
    """
    device = str(torch.device(device).type)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    e2e = [s for s in ([shapes] if isinstance(shapes, str) else shapes or []) if isinstance(s, str)
           and s in E2E_PRESETS]
    if e2e:  # the end-to-end presets time a model, not cases
        if len(e2e) != 1 or not isinstance(shapes, str) and len(shapes) != 1 or encodings or passes or dtypes:
            raise ValueError(f"the {e2e[0]!r} preset times a whole model: no other shapes, encodings, passes "
                             "or dtypes with it")
        if methods and any(mm not in E2E_METHODS for mm in methods):
            raise ValueError(f"methods: the {e2e[0]!r} preset compares {', '.join(E2E_METHODS)}")
        return run_e2e(device, e2e[0], progress=progress, methods=methods,
                       **{k: v for k, v in (("warmup", warmup), ("iters", iters)) if v is not None})
    cases, extra = _cases(device, shapes, encodings, passes)
    dtypes = [_dtype(d) for d in (dtypes or extra.get("dtypes") or
                                  (["bfloat16"] if device == "cuda" else ["float32", "bfloat16"]))]
    methods = list(methods or extra.get("methods") or METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; expected one of {', '.join(METHODS)}")
    if "copy" not in methods:
        methods.insert(0, "copy")  # every ratio needs the floor
    if "posenc" not in methods:
        methods.insert(1, "posenc")  # and every check compares with posenc
    warmup = warmup if warmup is not None else extra.get("warmup", 3 if device == "cuda" else 2)
    iters = iters if iters is not None else extra.get("iters", 10 if device == "cuda" else 7)

    meta = {"device": device, "device_name": _device_name(device), **_versions()}
    skip = {m: _available(m, device) for m in methods}
    jobs = [(c, p, dt) for c in cases for p in c.passes for dt in dtypes]
    total = len(jobs) * len(methods)
    done = 0
    rows = []
    for case, pass_, dtype in jobs:
        shape = case.shape
        enc = _encoding(case.encoding, shape.head_dim).to(device)
        frac = enc.rotated_pairs / (shape.head_dim // 2)
        grad = pass_ == "fwd+bwd"
        elem = torch.empty((), dtype=dtype).element_size()
        nbytes = 2 * elem * shape.batch * shape.seq * (shape.q_heads + shape.kv_heads) * shape.head_dim
        nbytes *= 2 if grad else 1
        # decode-sized problems are launch-bound: more calls per graph
        n_iter = iters * (10 if device == "cuda" and nbytes < (64 << 20) else 1)
        copy_us = copy_eager_us = None
        check_in = None  # fresh inputs for the checks, shared by every method of this case
        reference = None
        for method in methods:
            done += 1
            label = f"{shape.name} {case.encoding} {pass_} {str(dtype).replace('torch.', '')} {method}"
            if progress is not None:
                progress(done, total, label)
            row = {**meta, "shape": shape.name, "B": shape.batch, "S": shape.seq, "Hq": shape.q_heads,
                   "Hk": shape.kv_heads, "D": shape.head_dim, "dtype": str(dtype).replace("torch.", ""),
                   "encoding": case.encoding, "rotated_fraction": round(frac, 4), "pass": pass_,
                   "method": method, "us": None, "GB/s": None, "x_copy": None, "us_eager": None,
                   "x_copy_eager": None, "timing": None, "check": None}
            rows.append(row)
            if skip[method] or (method == "native_mul" and not grad):
                row["check"] = skip[method] or "fwd+bwd only"
                continue
            try:
                # 1. check against posenc on fresh inputs (each method gets its own clones: liger and the
                #    in-place pass write into them). fwd+bwd compares the gradients.
                if method in ("copy", "native_mul"):
                    row["check"] = "floor"
                else:
                    if check_in is None:
                        check_in = _Inputs(shape, dtype, device, enc, pass_, grad)
                        reference = [t.detach().clone() for t in
                                     _make_fn("posenc", "fwd" if pass_ == "fwd_inplace" else pass_, enc,
                                              _fresh(check_in, grad))()]
                    got = _make_fn(method, pass_, enc, _fresh(check_in, grad))()
                    err = max(_rel_err(g, r) for g, r in zip(got, reference))
                    tol = 8 * torch.finfo(dtype).eps
                    row["check"] = "ok" if err <= tol else f"MISMATCH rel err {err:.2e} > {tol:.1e}"
                    row["rel_err"] = err
                    if pass_ == "fwd_inplace" and method in ("hf_eager", "hf_compile"):
                        row["check"] += " (out of place)"
                    del got
                # 2. time on inputs of their own
                x = _Inputs(shape, dtype, device, enc, pass_, grad)
                fn = _make_fn(method, pass_, enc, x)
                if device == "cuda":
                    graph_us, eager_us, mode = _time_cuda(fn, warmup, n_iter, repeats)
                    us = graph_us if graph_us is not None else eager_us
                else:  # CPU calls are eager anyway
                    eager_us, mode = None, "perf_counter"
                    us, _ = _time_cpu(fn, warmup, iters)
                del fn, x
                moved = nbytes // 2 if grad and method == "copy" else nbytes  # the copy is one pass
                row.update({"us": round(us, 2), "timing": mode, "GB/s": round(moved / us / 1e3, 1)})
                if eager_us is not None:
                    row["us_eager"] = round(eager_us, 2)
                if method == "copy":
                    copy_us, copy_eager_us = us, eager_us
                if copy_us:
                    row["x_copy"] = round(us / copy_us, 3)
                if eager_us is not None and copy_eager_us:
                    row["x_copy_eager"] = round(eager_us / copy_eager_us, 3)
            except Exception as exc:  # one broken method must not sink the run
                msg = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
                row["check"] = f"failed: {type(exc).__name__}: {msg}"
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ end to end
@dataclasses.dataclass(frozen=True)
class E2EModel:
    """A Llama-shaped model with random weights (built from a config: nothing downloaded) and the two workloads
    timed on it: one training step (forward with labels, backward, AdamW step) at [train_batch, train_seq], and
    greedy decoding of decode_tokens tokens at decode_batch rows after a decode_prompt-token prefill."""
    name: str
    hidden: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    train_batch: int
    train_seq: int
    decode_batch: int
    decode_prompt: int
    decode_tokens: int


# Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, head_dim 64, llama3 scaling, its full vocabulary)
LLAMA_1B = E2EModel("llama3.2-1b", 2048, 16, 32, 8, 64, 8192, 128256, 4, 4096, 8, 128, 64)
TINY_LLAMA = E2EModel("tiny-llama", 64, 2, 4, 2, 16, 128, 256, 2, 32, 2, 8, 4)
E2E_METHODS = ("unpatched", "posenc", "liger")
E2E_PRESETS = {"e2e": LLAMA_1B, "e2e-tiny": TINY_LLAMA}


def _e2e_config(m: E2EModel):
    from transformers import LlamaConfig
    return LlamaConfig(
        hidden_size=m.hidden, num_hidden_layers=m.layers, num_attention_heads=m.q_heads,
        num_key_value_heads=m.kv_heads, head_dim=m.head_dim, intermediate_size=m.intermediate,
        vocab_size=m.vocab, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        attn_implementation="sdpa")


def _liger_rope():
    """liger-kernel's rope on Llama (rope=True, every other kernel off); returns the undo, or raises."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    import transformers.models.llama.modeling_llama as modeling
    saved = modeling.apply_rotary_pos_emb
    apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=False,
                                swiglu=False)

    def undo():
        modeling.apply_rotary_pos_emb = saved
    return undo


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _train_step_ms(model, ids, opt, device, warmup, iters):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.no_grad()
def _decode_ms(model, prompt, tokens, device, repeats):
    """Median ms per token of greedy decoding (a DynamicCache, one token per row a step, eager), prefill out."""
    import inspect
    from transformers import DynamicCache
    # the cache's keyword: `cache` in newer transformers (`past_key_values` deprecated), `past_key_values` before
    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    times, generated = [], None
    for _ in range(repeats + 1):  # the first run warms up
        cache = DynamicCache()
        out = model(input_ids=prompt, use_cache=True, **{key: cache})
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seq = [nxt]
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            out = model(input_ids=nxt, use_cache=True, **{key: cache})
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq.append(nxt)
        _sync(device)
        times.append((time.perf_counter() - t0) / max(1, tokens - 1))
        generated = torch.cat(seq, 1)
    return statistics.median(times[1:]) * 1e3, generated


def _e2e_setup(method, net, device):
    """Puts `method`'s rope into net; returns the undo."""
    from posenc.hf import patch, unpatch
    if method == "posenc":
        patch(net, "rope")
        return lambda: unpatch(net)
    if method == "liger":
        if device != "cuda":
            raise RuntimeError("GPU only")
        return _liger_rope()
    if method != "unpatched":
        raise ValueError(f"methods: unknown e2e method {method!r}; expected one of {E2E_METHODS}")
    return lambda: None


def run_e2e(device: str = "cpu", model: E2EModel | str = "e2e", progress: Callable | None = None,
            methods=None, warmup: int = 2, iters: int = 5, repeats: int = 3, rounds: int = 3) -> list[dict]:
    """Times one training step and greedy decoding of a Llama-shaped bf16 model (SDPA, eager, random weights)
    unpatched, with posenc.patch(model, "rope") (the fused op in every layer, same tables) and with liger-kernel's
    rope (GPU only, where liger_kernel imports). The methods take turns, `rounds` times (so that a drift of the
    machine's speed over the run does not favour one of them); a round's figure is a median (of `iters` steps, of
    `repeats` decodings). One row per (method, workload): ms (the median round; a step, or a token for
    decoding), ms_rounds, x_unpatched, and a check: the patched model's loss equals the unpatched one's to bf16
    rounding (fresh weights are the same for every method: one seed) and its greedy tokens are compared."""
    from transformers import LlamaForCausalLM
    device = str(torch.device(device).type)
    m = E2E_PRESETS[model] if isinstance(model, str) else model
    methods = list(methods or E2E_METHODS)
    if type(rounds) is not int or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    meta = {"device": device, "device_name": _device_name(device), **_versions(), "kind": "e2e",
            "model": m.name, "dtype": "bfloat16", "vocab": m.vocab}
    torch.manual_seed(0)
    with torch.device(device):
        net = LlamaForCausalLM(_e2e_config(m)).to(torch.bfloat16)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6, foreach=True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, m.vocab, (m.train_batch, m.train_seq), generator=gen).to(device)
    prompt = torch.randint(0, m.vocab, (m.decode_batch, m.decode_prompt), generator=gen).to(device)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    rows = {}
    for method in methods:
        rows[method] = [
            {**meta, "method": method, "workload": f"train step B={m.train_batch} S={m.train_seq}",
             "unit": "ms/step", "ms": None, "ms_rounds": [], "x_unpatched": None, "check": None},
            {**meta, "method": method, "workload": f"decode {m.decode_tokens} tokens B={m.decode_batch}",
             "unit": "ms/token", "ms": None, "ms_rounds": [], "x_unpatched": None, "check": None}]
    first = {}  # method -> (loss, greedy tokens) of its first round
    failed = set()
    total, done = 2 * len(methods) * rounds, 0
    for rnd in range(rounds):
        for method in methods:
            if method in failed:
                continue
            row_t, row_d = rows[method]
            undo = None
            try:
                undo = _e2e_setup(method, net, device)
                net.load_state_dict(state)  # the same weights for every method (AdamW steps moved them)
                opt.state.clear()
                if rnd == 0:
                    with torch.no_grad():
                        loss = float(net(input_ids=ids, labels=ids).loss)
                done += 1
                if progress is not None:
                    progress(done, total, f"e2e {m.name} {method} train step (round {rnd + 1}/{rounds})")
                net.train()
                row_t["ms_rounds"].append(round(_train_step_ms(net, ids, opt, device, warmup, iters), 3))
                net.load_state_dict(state)
                net.eval()
                done += 1
                if progress is not None:
                    progress(done, total, f"e2e {m.name} {method} decode (round {rnd + 1}/{rounds})")
                ms, tokens = _decode_ms(net, prompt, m.decode_tokens, device, repeats)
                row_d["ms_rounds"].append(round(ms, 3))
                if rnd == 0:
                    first[method] = (loss, tokens)
            except Exception as exc:
                failed.add(method)
                msg = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
                for r in (row_t, row_d):
                    r["ms_rounds"] = []
                    r["check"] = "GPU only" if msg == "GPU only" else f"failed: {type(exc).__name__}: {msg}"
            finally:
                if undo is not None:
                    undo()
                if device == "cuda":
                    torch.cuda.empty_cache()
    for method in methods:
        for r in rows[method]:
            if r["ms_rounds"]:
                r["ms"] = round(statistics.median(r["ms_rounds"]), 3)
    base_t, base_d = rows.get("unpatched", [None, None])
    for method in methods:
        row_t, row_d = rows[method]
        if method in failed:
            continue
        if method == "unpatched":
            if method in first:
                row_t["check"] = row_d["check"] = "baseline"
                row_t["loss"] = first[method][0]
            continue
        if method not in first:
            continue
        loss, tokens = first[method]
        row_t["loss"] = loss
        if "unpatched" not in first or "unpatched" in failed:
            continue
        base_loss, base_tokens = first["unpatched"]
        rel = abs(loss - base_loss) / max(1e-30, abs(base_loss))
        row_t["check"] = "ok" if rel <= 1e-3 else f"MISMATCH loss {loss:.6f} vs {base_loss:.6f}"
        row_t["loss_rel_diff"] = rel
        same = float((tokens == base_tokens).float().mean())
        row_d["check"] = "ok" if same == 1.0 else f"{same:.0%} of greedy tokens as unpatched"
        row_t["x_unpatched"] = round(row_t["ms"] / base_t["ms"], 3)
        row_d["x_unpatched"] = round(row_d["ms"] / base_d["ms"], 3)
    return [r for method in methods for r in rows[method]]


def _format_e2e(rows: list[dict]) -> str:
    head = rows[0]
    lines = [f"device: {head['device_name']} | torch {head['torch']} | posenc {head['posenc']} | "
             f"transformers {head.get('transformers')} | liger-kernel {head.get('liger_kernel')}",
             f"model: {head['model']} (random weights, vocab {head['vocab']}), {head['dtype']}, SDPA, eager"]
    cols = ["workload", "method", "ms", "unit", "x_unpatched", "rounds", "check"]

    def cell(r, c):
        if c == "rounds":
            return " ".join(f"{v:.2f}" for v in r.get("ms_rounds") or []) or "-"
        return "-" if r.get(c) is None else (f"{r[c]:.2f}" if c == "ms" else str(r[c]))
    table = [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    lines += [line(cols), line(["-" * w for w in widths])]
    for t in sorted(table, key=lambda t: t[0], reverse=True):
        lines.append(line(t))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- outputs
def format_table(rows: list[dict]) -> str:
    """A plain-text table: one line per row, grouped by case."""
    if not rows:
        return "(no rows)"
    if rows[0].get("kind") == "e2e":
        return _format_e2e(rows)
    head = rows[0]
    lines = [f"device: {head['device_name']} | torch {head['torch']} | posenc {head['posenc']} | "
             f"transformers {head.get('transformers')} | liger-kernel {head.get('liger_kernel')}"]
    cols = ["shape", "encoding", "pass", "dtype", "method", "us", "GB/s", "x_copy", "us_eager", "x_copy_eager",
            "timing", "check"]
    fmt = {"us": lambda v: f"{v:.1f}" if v is not None else "-",
           "us_eager": lambda v: f"{v:.1f}" if v is not None else "-",
           "x_copy_eager": lambda v: f"{v:.3f}" if v is not None else "-",
           "GB/s": lambda v: f"{v:.0f}" if v is not None else "-",
           "x_copy": lambda v: f"{v:.3f}" if v is not None else "-"}
    table = [[fmt.get(c, lambda v: "-" if v is None else str(v))(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    right = {"us", "GB/s", "x_copy", "us_eager", "x_copy_eager"}

    def line(vals):
        return "  ".join(v.rjust(w) if c in right else v.ljust(w) for c, v, w in zip(cols, vals, widths)).rstrip()

    lines += [line(cols), line(["-" * w for w in widths])]
    prev = None
    for r, t in zip(rows, table):
        key = (r["shape"], r["encoding"], r["pass"], r["dtype"])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        lines.append(line(t))
    return "\n".join(lines)


def write_json(rows: list[dict], path) -> None:
    """The rows as JSON at path, atomically (posenc.io)."""
    _io.write_json(rows, path, default=str)


def plot(rows: list[dict], path) -> None:
    """Bars of time / copy time per case, one bar per method; a line at the copy floor. A PNG at exactly
    path, written atomically."""
    plt = _io.pyplot()
    if rows and rows[0].get("kind") == "e2e":
        rows = [{**r, "shape": r["model"], "encoding": r["workload"], "pass": r["unit"],
                 "x_copy": r["x_unpatched"] if r["method"] != "unpatched" else (1.0 if r["ms"] else None)}
                for r in rows]
        methods = [m for m in E2E_METHODS if any(r["method"] == m and r["x_copy"] for r in rows)]
    else:
        methods = [m for m in METHODS if any(r["method"] == m and r["x_copy"] is not None for r in rows)]
    cases = []
    for r in rows:
        key = (r["shape"], r["encoding"], r["pass"], r["dtype"])
        if key not in cases:
            cases.append(key)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(cases) * max(1, len(methods)) / 3), 5))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, key in enumerate(cases):
            for r in rows:
                if (r["shape"], r["encoding"], r["pass"], r["dtype"]) == key and r["method"] == m and r["x_copy"]:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(r["x_copy"])
        ax.bar(xs, ys, width, label=m)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(["\n".join(k[:3]) + f"\n{k[3]}" for k in cases], fontsize=7)
    ax.set_ylabel("time / copy time (log)")
    title = rows[0]["device_name"] if rows else ""
    ax.set_title(f"posenc rotary benchmark — {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        _io.save_png(fig, path, dpi=120)
    finally:
        plt.close(fig)
