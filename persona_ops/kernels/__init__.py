"""Low-level kernels: oneDNN CPU linears, the Triton decode attention, torch.compile of blocks."""
