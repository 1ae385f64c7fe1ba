"""Model execution: everything that touches tensors for a batch (inputs, forward, sampling)."""
