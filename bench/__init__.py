"""Benchmarks: kernels, training throughput, convergence; each writes JSON rows under bench/results/."""
