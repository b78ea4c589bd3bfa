"""Model architectures used by the benchmarks (MLP, small CNN, two-head ResNets)."""
