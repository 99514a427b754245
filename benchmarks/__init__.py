"""Benchmarks: plain scripts, see benchmarks/common.py."""
