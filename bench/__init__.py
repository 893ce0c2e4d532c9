"""Benchmarks: `make bench` writes bench/results.json (flat, named figures) and a table."""
