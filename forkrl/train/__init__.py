"""forkrl.train."""
