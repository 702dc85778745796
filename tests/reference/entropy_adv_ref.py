"""Cheng et al.'s entropy-based advantage (arXiv 2506.14758, "Reasoning with Exploration: An Entropy
Perspective"), restated from the paper's equations as a slow per-token loop.

No public code was found (the search tools' code and docs corpora; a paper-notes page lists "Code:
None"), so this is the paper, not a transcription: for every response token t with advantage A_t
(GRPO's per-response advantage broadcast, or PPO's GAE) and entropy H_t of the policy that sampled,

    ψ(H_t) = min(α · H_t^detach, |A_t| / κ),        A_t^shaped = A_t + ψ(H_t)

with α > 0 the scale and κ > 1 the clip: the term is gradient-detached, is added for positive and
negative advantages alike, is at most |A_t|/κ so it never dominates nor (κ > 1) flips the sign. The
paper's settings: α = 0.4, κ = 2.
"""

from __future__ import annotations

import torch


def shaped_advantages(adv, entropy, mask, alpha=0.4, kappa=2.0):
    """``(B,)`` or ``(B, L)`` adv, ``(B, L)`` entropy and bool mask -> ``(shaped, psi)``, ``(B, L)``
    float64, each token computed on its own in Python floats; 0 outside ``mask``."""
    B, L = mask.shape
    shaped = torch.zeros(B, L, dtype=torch.float64)
    psi = torch.zeros(B, L, dtype=torch.float64)
    for i in range(B):
        for t in range(L):
            if not bool(mask[i, t]):
                continue
            a = float(adv[i] if adv.dim() == 1 else adv[i, t])
            h = float(entropy[i, t])
            p = min(alpha * h, abs(a) / kappa)
            psi[i, t] = p
            shaped[i, t] = a + p
    return shaped, psi
