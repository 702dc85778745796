"""Bridges from other RL trainers to forkrl's selection (the top layer: nothing in forkrl imports these).

- `forkrl.integrations.trl`: forkrl's exact batch-scope token selection inside TRL's `GRPOTrainer`.

Each bridge imports its trainer library lazily, so importing forkrl never needs it installed.
"""
