"""forkrl.rewards."""
