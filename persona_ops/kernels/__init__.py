"""Low-level kernels: oneDNN CPU linears, fused GPU projections, the Triton decode attention, torch.compile of
blocks."""
