"""csrc/rotary_cuda.cu compiled for the CPU, so that machines without a GPU (CI among them) test its logic.

The kernel's own source is compiled as C++ against cuda_emulator.h, after a few textual substitutions: the
CUDA headers go, each launch `kernel<<<grid, block, smem, stream>>>(p, L)` becomes a call of emu_launch, the
shared-memory declaration points at the emulator's buffer, vector, 16-byte (inline PTX) and strided scalar
accesses go through hooks that check alignment and record the bytes touched, and the CUDA registration
becomes a CPU one under the namespace `posenc_emu`. Each substitution is checked, so an edit of the kernel
that they no longer fit fails here loudly instead of testing something else.

What this checks: indexing, work split and launch shapes (those of a GPU with a given number of
multiprocessors and memory: with few multiprocessors, small inputs take the shapes of large ones), in-place
calls touching only the 16-byte blocks that hold rotating channels, alignment of every vector access, shared
memory read only after it is written. What it does not: timing, the GPU memory model beyond __syncthreads,
CUDA's own sincos (the host's float sin/cos run instead, as in the C++ CPU kernel), nvcc's code generation.
"""
import hashlib
import os
import re
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "..", "csrc")
NAMESPACE = "posenc_emu"
_CUDA_INCLUDES = ["c10/cuda/CUDAException.h", "c10/cuda/CUDAFunctions.h", "c10/cuda/CUDAGuard.h",
                  "c10/cuda/CUDAStream.h", "cuda_bf16.h", "cuda_fp16.h", "cuda_runtime.h"]
_SCHEMA_ARGS = ("Tensor? cos, Tensor? sin, Tensor? inv_freq, Tensor positions, float scale, int rotary_dim, "
                "int rotated_pairs, bool interleaved, bool inverse")


def _sub(pattern, repl, src, what, count=None):
    src, n = re.subn(pattern, repl, src)
    if n == 0 or (count is not None and n != count):
        raise AssertionError(f"cuda_emulator: {what}: {n} matches in csrc/rotary_cuda.cu, expected "
                             f"{count if count is not None else 'at least one'}; update tests/cuda_emulator.py")
    return src


def emulated_source(cuda_src: str) -> str:
    """The C++ translation unit: rotary_cuda.cu adapted to cuda_emulator.h."""
    s = cuda_src
    for inc in _CUDA_INCLUDES:
        s = _sub(re.escape(f"#include <{inc}>") + r"\n", "", s, f"#include <{inc}>", 1)
    s = _sub(re.escape('#include "rotary_op.h"'), '#include "cuda_emulator.h"\n#include "rotary_op.h"', s,
             "the rotary_op.h include", 1)
    s = _sub(r"\n[^\n]*cudaStream_t stream = [^\n]*;", "", s, "the stream", 1)
    s = _sub(r"(rotary_kernel<[^;]*?>)<<<([^,]+), ([^,]+), ([^,]+), [^>]*>>>\(p, L\);",
             r"emu_launch(\1, \2, \3, \4, p, L);", s, "kernel launches")
    if "<<<" in s:
        raise AssertionError("cuda_emulator: a kernel launch that the launch substitution does not fit")
    # the device is asked at every launch (set_device changes it), not cached
    s = _sub(re.escape("if (plan.multiprocessors == 0) {"), "if (true) {", s, "the device-plan cache", 1)
    s = _sub(re.escape("extern __shared__ __align__(16) unsigned char smem[];"),
             "unsigned char* smem = emu_smem;", s, "the shared-memory declaration", 1)
    s = _sub(r"reinterpret_cast<((?:const )?Vec<[^>]*>\*)>", r"emu_cast<\1>", s, "vector accesses")
    s = _sub(r"row\[\(ch \+ e\) \* cs\]", r"*emu_at(row + (ch + e) * cs)", s, "strided scalar accesses", 2)
    # the fast path's 16-byte global load and store (inline PTX)
    s = _sub(r"(?s)asm volatile\(\"ld\.global\.v4\.b32.*?\);", "emu_load16(at, &x);", s, "the 16-byte load", 1)
    s = _sub(r"(?s)asm volatile\(\"st\.global\.v4\.b32.*?\);", "emu_store16(at, &x);", s, "the 16-byte store", 1)
    registration = s.index("TORCH_LIBRARY_IMPL(posenc, CUDA, m)")
    return s[:registration] + f'''
TORCH_LIBRARY({NAMESPACE}, m) {{
  m.def("rotary(Tensor q, Tensor k, {_SCHEMA_ARGS}) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, {_SCHEMA_ARGS}) -> ()");
  m.impl("rotary", c10::DispatchKey::CPU, &posenc::rotary_cuda);
  m.impl("rotary_", c10::DispatchKey::CPU, &posenc::rotary_cuda_);
  m.def("set_device(int multiprocessors, int memory_clock_khz, int memory_bus_bits) -> ()",
        [](int64_t sms, int64_t clock_khz, int64_t bus_bits) {{
          emu_multiprocessors = static_cast<int>(sms);
          emu_memory_clock_khz = static_cast<int>(clock_khz);
          emu_memory_bus_bits = static_cast<int>(bus_bits);
        }});
  m.def("log_begin() -> ()", []() {{
    std::lock_guard<std::mutex> guard(emu_mutex);
    emu_log.clear();
    emu_logging = true;
    emu_misaligned = 0;
  }});
  // [accesses + 1, 2]: row 0 is (misaligned accesses, -1), then one (address, bytes) row per access
  m.def("log_end() -> Tensor", []() {{
    std::lock_guard<std::mutex> guard(emu_mutex);
    emu_logging = false;
    auto t = at::empty({{static_cast<int64_t>(emu_log.size()) + 1, 2}}, at::kLong);
    auto a = t.accessor<int64_t, 2>();
    a[0][0] = emu_misaligned;
    a[0][1] = -1;
    for (size_t i = 0; i < emu_log.size(); ++i) {{
      a[i + 1][0] = static_cast<int64_t>(emu_log[i].first);
      a[i + 1][1] = static_cast<int64_t>(emu_log[i].second);
    }}
    return t;
  }});
}}
'''


_OPS = None


def load():
    """Builds (once per source version, cached under the temp dir) and loads the emulated op: returns the
    `torch.ops.posenc_emu` namespace (rotary, rotary_, set_device, log_begin, log_end)."""
    global _OPS
    if _OPS is not None:
        return _OPS
    from torch.utils import cpp_extension

    # torch's extension loader needs ninja on PATH; a virtual environment run without activation has it
    # next to its interpreter only
    env_bin = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=env_bin):
        os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")

    def read(*parts):
        with open(os.path.join(*parts)) as f:
            return f.read()

    src = emulated_source(read(CSRC, "rotary_cuda.cu"))
    # every file the build reads (ops.cpp and all of csrc's headers, whichever the sources include)
    headers = sorted(name for name in os.listdir(CSRC) if name.endswith(".h"))
    key = hashlib.sha256("\n".join([src, read(HERE, "cuda_emulator.h"), read(CSRC, "ops.cpp"),
                                    *(read(CSRC, name) for name in headers), torch.__version__])
                         .encode()).hexdigest()[:16]
    build = os.path.join(tempfile.gettempdir(), f"posenc_cuda_emulator_{key}")
    os.makedirs(build, exist_ok=True)
    unit = os.path.join(build, "rotary_cuda_emulated.cpp")
    with open(unit, "w") as f:
        f.write(src)
    cpp_extension.load(
        name=f"{NAMESPACE}_{key}", sources=[unit, os.path.join(CSRC, "ops.cpp")],
        extra_include_paths=[HERE, CSRC],
        # -O1: the emulation runs few elements; no strict aliasing: the kernel's vector casts are CUDA idiom
        extra_cflags=["-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-w"],
        extra_ldflags=["-pthread"], is_python_module=False, build_directory=build, verbose=False)
    _OPS = getattr(torch.ops, NAMESPACE)
    return _OPS
