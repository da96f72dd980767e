"""Rotary microbenchmark: posenc's fused op vs a copy (the floor), transformers' eager apply_rotary_pos_emb,
torch.compile of it, and liger-kernel / flash-attn where they import. Prints a table (µs, GB/s, x copy).

    python benchmarks/bench_rotary.py                         # CUDA if available (preset "gpu"), else "cpu"
    python benchmarks/bench_rotary.py --device cpu            # 32 q / 8 kv heads, D=128, S=2048, fp32 + bf16
    python benchmarks/bench_rotary.py --preset llama-8b --json out.json --plot out.png
"""
import argparse
import sys

import torch

from posenc import bench


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--preset", default=None, help=f"one of {', '.join(bench.PRESETS)} "
                    "(default: gpu on CUDA, cpu on CPU)")
    ap.add_argument("--dtype", action="append", help="float32, float16, bfloat16 (repeatable)")
    ap.add_argument("--method", action="append", help=f"one of {', '.join(bench.METHODS)} (repeatable)")
    ap.add_argument("--encoding", action="append", help="rope, prope[:p], hope[:L], nope (repeatable)")
    ap.add_argument("--pass", dest="passes", action="append", help=f"one of {', '.join(bench.PASSES)}")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--json", help="write the rows as JSON to this path")
    ap.add_argument("--plot", help="write a PNG plot to this path (needs matplotlib)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    preset = args.preset or ("gpu" if device == "cuda" else "cpu")
    if preset not in bench.PRESETS:
        ap.error(f"--preset: unknown preset {preset!r}; expected one of {', '.join(bench.PRESETS)}")
    kwargs = dict(bench.PRESETS[preset])
    for key, value in (("dtypes", args.dtype), ("methods", args.method), ("encodings", args.encoding),
                       ("passes", args.passes), ("warmup", args.warmup), ("iters", args.iters)):
        if value is not None:
            kwargs[key] = value

    def progress(done, total, label):
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

    rows = bench.run(device=device, progress=progress, **kwargs)
    print(bench.format_table(rows))
    if args.json:
        bench.write_json(rows, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        bench.plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
