"""Rotary microbenchmark: `posenc bench` (posenc/bench.py) under another name, taking the same options.

    python benchmarks/bench_rotary.py                         # CUDA if available (preset "gpu"), else "cpu"
    python benchmarks/bench_rotary.py --device cpu            # 32 q / 8 kv heads, D=128, S=2048, fp32 + bf16
    python benchmarks/bench_rotary.py --preset llama-8b --json out.json --plot out.png
"""
import sys

from posenc.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
