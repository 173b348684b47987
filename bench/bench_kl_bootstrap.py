"""Benchmark kl_bootstrap against plain PyTorch and torch.compile.

    python bench/bench_kl_bootstrap.py --rows 4096 65536 --classes 5 20 128
    python bench/plot.py bench/results/kl_bootstrap.csv
"""
from bmssl.bench.kl_bootstrap import main

if __name__ == "__main__":
    main()
