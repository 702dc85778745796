"""Generation backends behind one interface: prompts in, a `Rollout` out.

- `forkrl.rollout.base`: the `Rollout` every backend returns, and `assemble_rollout` that builds it.
- `forkrl.rollout.hf.generate`: a KV-cache decode loop over any transformers causal LM (CPU or GPU);
  it also returns the sampler's entropies, so the trainer can skip the scoring pass.
- `forkrl.rollout.vllm.VLLMRollout`: a vLLM engine colocated with training on one CUDA GPU
  (`pip install 'forkrl[vllm]'`, `rollout.backend=vllm`); log-probs but no entropies.

Neither module is imported here, so `import forkrl.rollout` never needs vllm.
"""
