"""The arms and studies of `forkrl ablate`: each arm a set of dotted `forkrl train` overrides.

Two studies (`STUDIES`):

- ``paper``: the paper's ablations (arXiv 2506.01939): top-20%, all tokens, bottom 80%, a random 20%,
  rho = 0.1 and 0.5, the official-code and TRL conventions; written up as RESULTS.md.
- ``methods``: the entropy-aware methods forkrl implements (GSPO, CISPO, Clip-Cov, KL-Cov, Archer,
  Cheng et al.'s entropy-shaped advantage), each on all tokens against ``all`` and, where that is
  meaningful, combined with top-20% selection against ``top20``; written up as RESULTS-methods.md.

Scale (the built-in task, the paper preset): a step trains 16 prompts x 8 samples of ~27 tokens, about
3,500 response tokens; with ``optim.mini_batches=4`` (below) one loss call sees ~880 of them (~175
selected under top-20%), so Cui et al.'s cov_ratio (2e-4 Clip-Cov, 2e-3 KL-Cov) acts on
``max(1, floor(ratio * N)) = 1`` token per call, 4 per step: a share of ~1e-3 (5x Clip-Cov's 2e-4, half
KL-Cov's 2e-3), the fewest the floor allows.

Why the methods study sets ``optim.mini_batches=4`` on every arm, its baselines included: with one
optimizer step per RL step (the paper study) the update is exactly on-policy, the ratio r = 1, and then
gspo, cispo and the clip ranges of archer give the same gradient as ``clip`` (A·∇logp on each token),
and kl_cov's |log r| penalty has zero gradient: those arms would equal ``all`` by construction. Four
mini-batches (Cui et al.'s recipes take 8 from 256 prompts, GSPO's paper 4) make updates 2-4
off-policy so the ratio-based parts can act.

Why no ``top20_clip_cov`` and no ``top20_archer``: Clip-Cov removes the gradient of a random few tokens,
the same kind of intervention as token selection, so on top of it it would only drop one or two of the
~100-200 already selected tokens per loss call; Archer's point is to keep training the low-entropy
tokens under a tighter clip, which top-20% selection removes. KL-Cov adds a penalty that selection does
not, so ``top20_kl_cov`` is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

_ALL = ["preset=paper", "selection.rule=all", "selection.rho=1.0"]

# arm -> (what it tests, overrides applied before the study's and the user's extra overrides)
ARMS: dict[str, tuple[str, list[str]]] = {
    "top20": ("paper preset: top-20% entropy tokens", ["preset=paper"]),
    "all": ("all tokens (plain DAPO)", _ALL),
    "bottom80": ("bottom-80% entropy tokens", ["preset=paper", "selection.rule=bottom", "selection.rho=0.8"]),
    "random20": (
        "a uniform random 20% of tokens",
        ["preset=paper", "selection.rule=random", "selection.rho=0.2"],
    ),
    "top10": ("top-10% entropy tokens", ["preset=paper", "selection.rho=0.1"]),
    "top50": ("top-50% entropy tokens", ["preset=paper", "selection.rho=0.5"]),
    "official": ("official verl code's conventions", ["preset=official"]),
    "trl": ("TRL top_entropy_quantile=0.2 conventions", ["preset=trl"]),
    # ---- the methods study
    "gspo": (
        "GSPO on all tokens: one ratio per sequence, clip 3e-4/4e-4 (GSPO paper's ranges; DAPO's "
        "0.2/0.28 never binds on a sequence ratio)",
        [*_ALL, "loss.mode=gspo", "loss.eps_low=0.0003", "loss.eps_high=0.0004"],
    ),
    "top20_gspo": (
        "GSPO on the top-20% tokens (the sequence ratio over the selected tokens, verl's form), "
        "clip 3e-4/4e-4",
        ["preset=paper", "loss.mode=gspo", "loss.eps_low=0.0003", "loss.eps_high=0.0004"],
    ),
    "cispo": (
        "CISPO on all tokens: clipped, detached IS weight on every token's log-prob; no lower "
        "bound (MiniMax-M1), upper 1 + 0.28",
        [*_ALL, "loss.mode=cispo", "loss.cispo_clip_low=false"],
    ),
    "top20_cispo": (
        "CISPO on the top-20% tokens, no lower bound, upper 1 + 0.28",
        ["preset=paper", "loss.mode=cispo", "loss.cispo_clip_low=false"],
    ),
    "clip_cov": (
        "Clip-Cov on all tokens: detach a random cov_ratio=2e-4 of the tokens with 1 < cov < 5 "
        "(Cui et al.'s recipe; the max(1, .) floor makes it 1 token per loss call, 4 per step); "
        "the DAPO clip kept (their recipe widens it to [0, 2])",
        [*_ALL, "loss.mode=clip_cov", "loss.cov_ratio=0.0002"],
    ),
    "kl_cov": (
        "KL-Cov on all tokens: |log r| penalty (coef 1) on the top cov_ratio=2e-3 tokens by "
        "covariance (Cui et al.'s 7B recipe, kl_cov_ratio 0.002): 1 token per loss call, 4 per step",
        [*_ALL, "loss.mode=kl_cov", "loss.cov_ratio=0.002"],
    ),
    "top20_kl_cov": (
        "KL-Cov on the top-20% tokens, cov_ratio=2e-3 of the selected tokens: still 1 token "
        "per loss call (the floor)",
        ["preset=paper", "loss.mode=kl_cov", "loss.cov_ratio=0.002"],
    ),
    "archer": (
        "Archer on all tokens, its defaults: per response, tokens above the 80% entropy quantile "
        "clip at 0.5/0.5 without KL, the rest at 0.2/0.2 with KL 1e-3 (loads a reference model)",
        [*_ALL, "loss.mode=archer"],
    ),
    "entadv": (
        "entropy-shaped advantage on all tokens: A + min(0.4 H, |A|/2) (Cheng et al.'s alpha, kappa)",
        [*_ALL, "algorithm.entropy_adv_alpha=0.4", "algorithm.entropy_adv_kappa=2.0"],
    ),
    "top20_entadv": (
        "entropy-shaped advantage, trained on the top-20% tokens",
        ["preset=paper", "algorithm.entropy_adv_alpha=0.4", "algorithm.entropy_adv_kappa=2.0"],
    ),
}

# What the arms vary, or what ablate sets itself: extra overrides may not touch these.
RESERVED = {
    "preset": "the arms set it",
    "selection.rule": "the arms set it",
    "selection.rho": "the arms set it",
    "loss.mode": "the arms set it",
    "loss.eps_low": "the arms set it",
    "loss.eps_high": "the arms set it",
    "loss.cispo_clip_low": "the arms set it",
    "loss.cov_ratio": "the arms set it",
    "algorithm.entropy_adv_alpha": "the arms set it",
    "algorithm.entropy_adv_kappa": "the arms set it",
    "train.seed": "use --seeds",
    "train.out_dir": "use --out",
    "train.steps": "use --steps",
    "train.eval_every": "use --eval-every",
    "train.eval_n": "use --eval-n",
}


@dataclass(frozen=True)
class Study:
    """A default arm list, overrides every arm of the study gets (after the arm's, before the user's),
    the default study folder and the file name of its write-up there."""

    what: str
    arms: tuple[str, ...]
    base: tuple[str, ...] = ()
    out: str = "runs/ablate"
    results_name: str = "RESULTS.md"
    #: --steps, --eval-every, --eval-n when the command does not give them
    defaults: tuple[int, int, int] = (20, 2, 500)
    #: (k, problems) of a sampled avg@k of the base and every final model (forkrl.analysis.ablate_sampled)
    sampled: tuple[int, int] | None = None
    #: the write-up's title and the sentence that says what was trained
    title: str = "Ablations at laptop scale"
    setting: str = "on the built-in task from the shipped warm start"


METHOD_ARMS = (
    "gspo",
    "top20_gspo",
    "cispo",
    "top20_cispo",
    "clip_cov",
    "kl_cov",
    "top20_kl_cov",
    "archer",
    "entadv",
    "top20_entadv",
)


def recipe_overrides(name: str) -> tuple[str, ...]:
    """A shipped config (`forkrl/configs/NAME.yaml`) as dotted overrides, less what the arms and ablate
    set (`RESERVED`, `train.threads`, `train.progress`, `train.tensorboard`), so a study runs the recipe.

    >>> "optim.lr=5e-06" in recipe_overrides("smollm2"), any(o.startswith("preset=") for o in recipe_overrides("smollm2"))
    (True, False)
    """
    from forkrl.config.files import read_yaml, resolve_config_path

    skip = {*RESERVED, "train.threads", "train.progress", "train.tensorboard"}
    out = []
    for section, values in read_yaml(resolve_config_path(name)).items():
        for key, value in values.items() if isinstance(values, dict) else ():
            if f"{section}.{key}" not in skip:
                out.append(
                    f"{section}.{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"
                )
    return tuple(out)


STUDIES: dict[str, Study] = {
    "paper": Study(
        "the paper's ablations: token selection rules, rho, conventions",
        ("top20", "all", "bottom80", "random20", "top10", "top50", "official", "trl"),
    ),
    "methods": Study(
        "entropy-aware methods alone and with top-20% selection, against the all/top20 baselines",
        ("top20", "all", *METHOD_ARMS),
        base=("optim.mini_batches=4",),
        out="runs/ablate-methods",
        results_name="RESULTS-methods.md",
    ),
    "smollm2": Study(
        "the paper's selection rules on a real model: SmolLM2-135M-Instruct with the smollm2 recipe "
        "(forkrl/configs/smollm2.yaml), judged on sampled held-out accuracy",
        ("top20", "all", "bottom80", "random20"),
        base=recipe_overrides("smollm2"),
        out="runs/ablate-smollm2",
        results_name="RESULTS-smollm2.md",
        defaults=(30, 10, 64),
        sampled=(4, 200),
        title="The paper's ablations on a real model: SmolLM2-135M-Instruct",
        setting="on SmolLM2-135M-Instruct with the smollm2 recipe (the `arith` task, add1)",
    ),
}


def baseline_of(arm: str) -> str:
    """`top20` for a top20_ combination, `all` for a method on all tokens.

    >>> baseline_of("top20_kl_cov"), baseline_of("gspo")
    ('top20', 'all')
    """
    return "top20" if arm.startswith("top20_") else "all"
