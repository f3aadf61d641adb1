"""Benchmarks: each module writes benchmarks/results/NAME.json and prints a table (`make bench`)."""
