"""Variant: in place, the pipeline also where cos/sin are many per unit, and seq-major blocks pipelined too."""
import re, sys
d = sys.argv[1]
p = f"{d}/csrc/launch_plan.h"; s = open(p).read()
s2 = re.sub(r"\(inter \? 2 \* n < in\.rotary_dim : n < half\) &&\s*4 \* L\.n_stride < per_token",
            "(inter ? 2 * n < in.rotary_dim : n < half)", s)
s2 = s2.replace("enum class KernelKind { kNone, kPlain, kPipelined, kSeqMajor };",
                "enum class KernelKind { kNone, kPlain, kPipelined, kSeqMajor, kPipelinedSeqMajor };")
s2 = s2.replace("L.seq_major = unit && !L.pipeline && in.shared_positions", "L.seq_major = unit && in.shared_positions")
s2 = s2.replace("L.kernel = L.pipeline ? KernelKind::kPipelined : L.seq_major ? KernelKind::kSeqMajor : KernelKind::kPlain;",
                "L.kernel = L.pipeline && L.seq_major ? KernelKind::kPipelinedSeqMajor : L.pipeline ? KernelKind::kPipelined : L.seq_major ? KernelKind::kSeqMajor : KernelKind::kPlain;")
assert s2.count("kPipelinedSeqMajor") == 2 and "!L.pipeline" not in s2, s2
open(p, "w").write(s2)
p = f"{d}/csrc/rotary_cuda.cu"; s = open(p).read()
s2 = s.replace('static_assert(!(kSeqMajor && (kPipe || !kUnit)), "seq-major blocks only on the fast path");',
               'static_assert(!(kSeqMajor && !kUnit), "seq-major blocks only on the fast path");')
s2 = s2.replace("""      case KernelKind::kSeqMajor:""", """      case KernelKind::kPipelinedSeqMajor:
        rotary_kernel<T, V, kInter, true, true><<<grid, threads, smem, stream>>>(p, L);
        break;
      case KernelKind::kSeqMajor:""")
assert s2 != s and "kPipelinedSeqMajor" in s2
open(p, "w").write(s2)
print("pipesm applied")
