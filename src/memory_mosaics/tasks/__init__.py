"""Benchmark tasks with their data generators and harnesses (RegBench, three moons)."""
