"""Benchmarks of georep (not tests: run by hand or with ``make bench``)."""
