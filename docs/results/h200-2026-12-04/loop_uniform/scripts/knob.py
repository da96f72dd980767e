# Applies the experiment's plan override to a copy of csrc (argv[1]): env PX="tpb,seq,pipe,threads" (-1: keep)
import re, sys
d = sys.argv[1]
bounds = sys.argv[2] if len(sys.argv) > 2 else None
p = f"{d}/rotary_cuda.cu"; s = open(p).read()
if bounds:
    assert "__launch_bounds__(kThreads)" in s
    s = s.replace("__launch_bounds__(kThreads)", f"__launch_bounds__({bounds})")

s = s.replace("#include <limits>", "#include <limits>\n#include <cstdio>\n#include <cstdlib>")
old = "  const LaunchPlan plan = plan_launch(in, device_plan());\n"
assert old in s
new = """  LaunchPlan plan = plan_launch(in, device_plan());
  if (const char* px = std::getenv("PX"); px != nullptr && plan.kernel != KernelKind::kNone && plan.head_blocks == 1) {
    int tpb = -1, seq = -1, pipe = -1, thr = -1, bat = -1;
    std::sscanf(px, "%d,%d,%d,%d,%d", &tpb, &seq, &pipe, &thr, &bat);
    if (tpb > 0) plan.tokens_per_block = static_cast<int>(std::min<int64_t>(tpb, plan.tokens));
    if (seq >= 0) plan.seq_major = seq && plan.vector > 1 && in.shared_positions && in.batch > 1 && plan.tokens_per_block > 1;
    if (pipe >= 0) plan.pipeline = pipe && plan.vector > 1 && plan.prefetch;
    if (plan.pipeline) plan.seq_major = false;
    const int64_t per_token = static_cast<int64_t>(in.q_in.heads + in.k_in.heads) * plan.units_per_head;
    const int64_t upb = plan.tokens_per_block * per_token;
    plan.threads = static_cast<int>(std::min<int64_t>(thr > 0 ? thr : 128, (upb + 31) / 32 * 32));
    plan.cos_rows = plan.seq_major ? static_cast<int>(std::min<int64_t>(plan.tokens_per_block,
                                 (plan.tokens_per_block + in.batch - 2) / in.batch + 1)) : plan.tokens_per_block;
    plan.token_blocks = (plan.tokens + plan.tokens_per_block - 1) / plan.tokens_per_block;
    plan.shared_bytes = static_cast<size_t>(plan.tokens_per_block) * plan.heads_per_block * 2 * sizeof(void*) +
                   (plan.tokens_per_block + 1) / 2 * 2 * sizeof(int64_t) + 2 * sizeof(Acc) * plan.cos_rows * plan.n_stride + plan.tokens_per_block * sizeof(int);
    plan.kernel = plan.pipeline ? KernelKind::kPipelined : plan.seq_major ? KernelKind::kSeqMajor : KernelKind::kPlain;
    if (bat > 0 && HAS_BATCH) plan.batch = plan.pipeline || plan.vector == 1 ? 1 : bat;
    if (std::getenv("PXV")) std::fprintf(stderr, "plan tpb=%d seq=%d pipe=%d thr=%d blocks=%lld smem=%zu\\n", plan.tokens_per_block, plan.seq_major, plan.pipeline, plan.threads, (long long)plan.token_blocks, plan.shared_bytes);
  }
"""
if "plan.batch" not in s:  # a kernel without batches: the field is ignored
    new = "\n".join(l for l in new.split("\n") if "HAS_BATCH" not in l)
s = s.replace(old, new.replace("HAS_BATCH", "true"))
if len(sys.argv) > 3 and sys.argv[3] == "bf16":  # experiment builds: bf16 kernels only (compile time)
    old_d = 'AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "posenc_rotary_cuda",\n                                  [&] { launch_typed<scalar_t>(p); });'
    assert old_d in s
    s = s.replace(old_d, 'TORCH_CHECK(dtype == at::kBFloat16, "experiment build: bf16 only"); launch_typed<c10::BFloat16>(p);')
open(p, "w").write(s)
