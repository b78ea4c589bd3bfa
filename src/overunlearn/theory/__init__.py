"""Exact solvers from the paper (linear model, linear networks, two-layer width) used as test oracles."""
