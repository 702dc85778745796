"""Writing rollout dumps: a row per response with its tokens and their entropy, log-prob, selection.

A dump is a `.parquet` file (needs pyarrow) or a `.jsonl` file, chosen by the suffix. Each row holds:

    step, row, prompt, text, adv, reward      per-response scalars (prompt/text/adv/reward may be null)
    token_ids, tokens                          the response tokens (ids and their decoded strings)
    entropy, logp                              float per token: H and log p of the sampled token at T
    sel, loss                                  bool per token: selected (top-rho) and in the loss mask
    cov                                        trainer dumps: float per token, Cui et al.'s covariance
                                               (A - mean A)(logp - mean logp), means over the step's
                                               selected tokens (every rank's with loss.cov_across_ranks);
                                               0 on unselected tokens
    acted                                      trainer dumps, modes that mark tokens: bool per token, the
                                               tokens loss.mode acted on at ratio 1 (meta `acted` says
                                               what they are: `forkrl.core.loss_modes.ACTED`)
    top_tokens, top_probs                      optional: the k most likely tokens at each position, with
                                               their probabilities under softmax(z / T)

Run-level facts (model, temperature, rho, ...) go to the file's metadata (the parquet schema metadata,
or a first jsonl line `{"__meta__": {...}}`). A trainer dump's meta also holds `loss_mode`, `cov` and
`acted` (a line each on the two columns; `acted` says "none" for a mode without the column: `clip`,
`gspo` and `cispo` bind no token at ratio 1). Both columns are `forkrl.core.mode_tokens` on the step's
whole batch at the rollout's policy: what the update's first micro-batch saw when the step is one
micro-batch (the default); with several, each micro-batch had its own statistics.

The trainer writes dumps (`train.dump_every`: `rollouts/step_000010.jsonl`, ...), and so do the
analysis tools (`forkrl analyze generate`); `forkrl.analysis.dump.read_dump` reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from forkrl.core.loss_modes import ACTED
from forkrl.core.mode_tokens import mode_tokens
from forkrl.training.update import loss_mode

#: the file types a dump can be (by suffix)
SUFFIXES = (".parquet", ".jsonl")
#: key of the run-level metadata: parquet schema metadata, or the first jsonl line
META_KEY = "__meta__"


def token_strings(tokenizer, response_ids: Tensor, response_mask: Tensor) -> list[list[str]]:
    """The decoded text of each valid response token, one list per row (special tokens kept).

    Decoding one id at a time keeps the tokens readable ("Ġthe" -> " the"); a multi-byte character
    split over several byte-level tokens shows as U+FFFD in each part.
    """
    out = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        valid = [i for i, m in zip(ids, mask) if m]
        out.append(tokenizer.batch_decode([[i] for i in valid]))
    return out


def _rows_list(t: Tensor | None, lengths: list[int], cast) -> list | None:
    if t is None:
        return None
    values = t.detach().cpu().tolist()
    return [[cast(v) for v in row[:n]] for row, n in zip(values, lengths)]


def dump_rollout(
    path: str | Path,
    *,
    tokens: list[list[str]],
    entropy: Tensor,
    logp: Tensor,
    sel_mask: Tensor,
    loss_mask: Tensor,
    step: int = 0,
    token_ids: Tensor | None = None,
    adv: Tensor | None = None,
    rewards: Tensor | None = None,
    prompts: list[str] | None = None,
    texts: list[str] | None = None,
    top_tokens: list[list[list[str]]] | None = None,
    top_probs: Tensor | None = None,
    cov: Tensor | None = None,
    acted: Tensor | None = None,
    meta: dict | None = None,
) -> Path:
    """Write one rollout batch to `path` (`.parquet` or `.jsonl`; an existing file is replaced).

    Args:
        tokens: the decoded response tokens of each row (see `token_strings`); row i keeps the first
            len(tokens[i]) positions of every (B, L) tensor below, so pass the tokens of the valid
            response (`response_mask`), which may be longer than the loss mask's (overlong filter).
        entropy, logp: (B, L) float, the scoring pass's H and log-prob of each sampled token.
        sel_mask, loss_mask: (B, L) bool, the selected tokens and the valid tokens of the loss.
        step: the RL step (or 0 for an analysis dump).
        token_ids: (B, L) long response ids. adv, rewards: (B,) per-response advantage and reward
            (a per-token (B, L) advantage is reduced to its first position).
        prompts, texts: one string per row (prompts are repeated per sample by the caller).
        top_tokens: [row][pos] -> the k most likely token strings; top_probs: (B, L, k) their probabilities.
        cov: (B, L) float, acted: (B, L) bool: the loss mode's tokens (`mode_columns`).
        meta: run-level facts saved with the file (json-serialisable).
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"dump path {str(path)!r} must end in .parquet or .jsonl")
    B = len(tokens)
    for name, t in (("entropy", entropy), ("logp", logp), ("sel_mask", sel_mask), ("loss_mask", loss_mask)):
        if t.dim() != 2 or t.shape[0] != B:
            raise ValueError(
                f"dump_rollout: {name} must be (B, L) with B = len(tokens) = {B}; got {tuple(t.shape)}"
            )
    lengths = [len(r) for r in tokens]
    if lengths and max(lengths) > entropy.shape[1]:
        raise ValueError(
            f"dump_rollout: a row has {max(lengths)} tokens but the tensors have L={entropy.shape[1]}"
        )
    if adv is not None and adv.dim() == 2:
        adv = adv[:, 0]
    cols = {
        "step": [int(step)] * B,
        "row": list(range(B)),
        "prompt": list(prompts) if prompts is not None else [None] * B,
        "text": list(texts) if texts is not None else ["".join(r) for r in tokens],
        "adv": [float(a) for a in adv.tolist()] if adv is not None else [None] * B,
        "reward": [float(r) for r in rewards.tolist()] if rewards is not None else [None] * B,
        "token_ids": _rows_list(token_ids, lengths, int) or [[] for _ in range(B)],
        "tokens": [list(r) for r in tokens],
        "entropy": _rows_list(entropy.float(), lengths, float),
        "logp": _rows_list(logp.float(), lengths, float),
        "sel": _rows_list(sel_mask.bool(), lengths, bool),
        "loss": _rows_list(loss_mask.bool(), lengths, bool),
        "cov": _rows_list(cov.float(), lengths, float) if cov is not None else None,
        "acted": _rows_list(acted.bool(), lengths, bool) if acted is not None else None,
        "top_tokens": [[list(p) for p in r[:n]] for r, n in zip(top_tokens, lengths)] if top_tokens else None,
        "top_probs": _rows_list(top_probs.float(), lengths, lambda v: [float(x) for x in v])
        if top_probs is not None
        else None,
    }
    cols = {k: v for k, v in cols.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    if path.suffix == ".parquet":
        _write_parquet(path, cols, meta)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({META_KEY: meta}) + "\n")
            for i in range(B):
                fh.write(json.dumps({k: v[i] for k, v in cols.items()}) + "\n")
    return path


def dump_step(
    path: str | Path,
    tokenizer,
    scored,
    adv: Tensor,
    sel_mask: Tensor,
    *,
    step: int,
    rewards: Tensor | None = None,
    prompts: list[str] | None = None,
    cov: Tensor | None = None,
    acted: Tensor | None = None,
    meta: dict | None = None,
    show: int = 0,
    log_path: Path | None = None,
) -> Path:
    """Dump one RL step: the scored rollout (`forkrl.training.update.Scored`), its advantages and the
    selection that trained (`Selection.sel_mask`; the trainer passes an empty one when the actor did
    not update). `prompts` are one per row (each group's prompt `group_size` times); `cov`, `acted`:
    `mode_columns`.

    `show` > 0 (`train.log_completions`, TRL's `log_completions`) also prints that many of the step's
    completions, each token selected for the update in [brackets], with its reward, advantage and mean
    entropy, and appends the same lines to `log_path` (the run's train.log)."""
    ro = scored.rollout
    if show > 0:
        tokens = token_strings(tokenizer, ro.response_ids, ro.response_mask)
        lines = completion_lines(tokens, scored.entropy, sel_mask, adv, rewards, step=step, n=show)
        print("\n".join(lines), flush=True)
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write("".join(f"{line}\n" for line in lines))
    return dump_rollout(
        path,
        tokens=token_strings(tokenizer, ro.response_ids, ro.response_mask),
        token_ids=ro.response_ids,
        entropy=scored.entropy,
        logp=scored.old_logp,
        sel_mask=sel_mask,
        loss_mask=scored.loss_mask,
        adv=adv,
        rewards=rewards,
        prompts=prompts,
        texts=ro.texts,
        step=step,
        cov=cov,
        acted=acted,
        meta=meta or {},
    )


#: meta `cov` of a trainer dump
COV_MEANING = (
    "(A - mean A)(logp - mean logp) per selected token, means over the step's selected tokens "
    "(every rank's with loss.cov_across_ranks), at the rollout's policy"
)


def mode_columns(scored, adv: Tensor, sel_mask: Tensor, s, env) -> tuple[Tensor, Tensor | None, dict]:
    """The dump's `cov` and `acted` columns and their meta for the run's loss mode (`UpdateSettings`
    `s`), at the rollout's policy (`forkrl.core.mode_tokens`). Every rank calls: with
    `loss.cov_across_ranks` the statistics span them (a rank with no rows passes its empty batch)."""
    mode = loss_mode(s, env)
    cov, acted = mode_tokens(
        scored.old_logp,
        adv,
        scored.loss_mask,
        sel_mask,
        mode,
        eps_low=s.loss.eps_low,
        eps_high=s.loss.eps_high,
        dual_clip=s.loss.dual_clip,
        log_ratio_clamp=s.loss.log_ratio_clamp,
        entropy=scored.entropy,
    )
    if acted is None:
        said = f"none: {mode.name} marks no token (no acted column; clip, gspo, cispo bind none at ratio 1)"
    else:
        said = ACTED.get(
            mode.name, f"the tokens {mode.name} marks in parts['acted'] (no description registered)"
        )
    return cov, acted, {"loss_mode": mode.name, "cov": COV_MEANING, "acted": said}


def _write_parquet(path: Path, cols: dict, meta: dict) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(
            f"writing {path} needs pyarrow (pip install 'forkrl[parquet]'), or use a .jsonl path"
        ) from None
    table = pa.table(cols)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta)})
    pq.write_table(table, path)


def completion_lines(tokens, entropy: Tensor, sel_mask: Tensor, adv: Tensor, rewards, *, step: int, n: int):
    """Plain-text lines for the first `n` completions of a step: selected tokens in [brackets].

    >>> import torch
    >>> completion_lines([["a", "b", "c"]], torch.tensor([[0.1, 2.0, 0.3]]), torch.tensor([[False, True, False]]),
    ...                  torch.tensor([0.5]), torch.tensor([1.0]), step=3, n=1)
    ['step 3 sample 0: reward 1.000  adv +0.500  H 0.800  selected 1/3', '  a[b]c']
    """
    out = []
    for i, toks in enumerate(tokens[:n]):
        k = len(toks)
        h = float(entropy[i, :k].mean()) if k else float("nan")
        a = float(adv[i].mean()) if adv.dim() > 1 else float(adv[i])
        r = float(rewards[i]) if rewards is not None else float("nan")
        sel = sel_mask[i, :k].tolist()
        out.append(
            f"step {step} sample {i}: reward {r:.3f}  adv {a:+.3f}  H {h:.3f}  selected {sum(sel)}/{k}"
        )
        out.append("  " + "".join(f"[{t}]" if s else t for t, s in zip(toks, sel)).replace("\n", "\\n"))
    return out
