"""batchd: a batching inference server for transformer models."""
__version__ = "0.1.0"
