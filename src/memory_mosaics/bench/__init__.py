"""Benchmarks that measure the library itself (speed, memory); they write JSON, they never assert."""
