"""Generation benchmark: see README.md in this folder (`python -m benchmarks.generation --help`)."""
