"""Reports: plots and HTML pages of vectors, sweeps and trajectories."""
