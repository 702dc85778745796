"""forkrl: RLVR for language models on the forking (high-entropy) tokens.

Wang et al., 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
Reinforcement Learning for LLM Reasoning" (arXiv 2506.01939).
"""

__version__ = "0.1.0"
