"""forkrl.models."""
