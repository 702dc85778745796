"""forkrl.analysis: entropy statistics, forking-token tables, word clouds, checkpoint overlap,
dual-temperature decoding, token view and training reports.

Modules (imported on use; none is loaded by `import forkrl`):

- `dump`: `read_dump`, the rollout dumps that `forkrl.training.dump` writes (per-token entropy, log-prob,
  selection) and `generate` or the trainer's `train.dump_every` produce.
- `generate`: `generate_dump`, fresh responses with top-k alternatives (`forkrl analyze generate`).
- `stats`, `wordcloud`: percentiles, histogram, token tables, word clouds (`forkrl analyze stats`).
- `view`: the HTML token view (`forkrl analyze view`).
- `overlap`: top-rho position overlap across checkpoints (`forkrl analyze overlap`).
- `dual_temp`: `DualTemperatureProcessor`, `dual_temperature_eval`, `sweep` (`forkrl analyze sweep`).
- `report`: the HTML training report (`forkrl report`).
- `ablate`, `ablate_results`: the paper's ablations, runs and write-up (`forkrl ablate`, RESULTS.md).
- `cli`: `add_analyze_commands(subparsers)`, `add_report_command(subparsers)`.
"""
