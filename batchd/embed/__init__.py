"""Embeddings: batches of inputs, each batch one step in which every input finishes."""
