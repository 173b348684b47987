"""Benchmark the fused multi-view NT-Xent against plain PyTorch and torch.compile.

    python bench/bench_ntxent.py                      # CPU: B 1024 4096 8192, d 128, M 2 4, fp32
    python bench/bench_ntxent.py --batches 4096 --views 2 --no-compile
    python bench/plot.py bench/results/ntxent.csv
"""
from bmssl.bench.ntxent import main

if __name__ == "__main__":
    main()
