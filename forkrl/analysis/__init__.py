"""forkrl.analysis."""
