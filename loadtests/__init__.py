"""Benchmarks and load tests (never run by `make test`)."""
