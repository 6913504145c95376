"""Interpretability: activation capture, interventions (steering, ablation, capping), persona vectors,
projections, the persona space and the Assistant Axis."""
