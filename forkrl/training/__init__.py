"""forkrl.training: the RL loop (`forkrl.training.trainer.Trainer`), its set-up (`setup`), and the parts
of one step (rollouts, update, selection, checkpoints). `forkrl.Trainer` and `forkrl.train(...)` are
the public faces of it (docs/DESIGN.md, "Layout")."""
