"""forkrl.tasks."""
