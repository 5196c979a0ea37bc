"""Harnesses the tests and benchmarks share (readings of /proc, a host killed with -9): not part of the product."""
