"""Training: data mixtures, an explicit loop per stage, and the run directory it fills."""
