"""SmolLM2-135M-Instruct end to end (issue 26): training on the `arith` task with the chat template, the
warnings a real model gets for the tiny model's defaults, and the sampler's log-probs and entropies
equal to a scoring forward on real rollouts. Needs `bash scripts/setup.sh --test` (the `smollm2_dir`
fixture skips without it, and fails under CI)."""

import json

import pytest
import torch

from forkrl.config import load_config
from forkrl.training.trainer import train

pytestmark = pytest.mark.slow  # loads a 135M-parameter model


def _cfg(tmp_path, *extra):
    return load_config(
        None,
        [
            "model.path=smollm2-135m-instruct",
            "task.name=arith",
            f"train.out_dir={tmp_path / 'run'}",
            "train.steps=1",
            "train.eval_n=4",
            "train.progress=false",
            "train.tensorboard=false",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=24",
            "sampling.dynamic=false",
            *extra,
        ],
    )


def test_tiny_defaults_on_a_real_model_are_warned(smollm2_dir, tmp_path, capsys):
    run_dir, summary = train(_cfg(tmp_path))  # the tiny model's lr and no chat template
    err = capsys.readouterr().err
    assert "forkrl: warning: optim.lr=0.0002 is the step size tuned for the shipped" in err
    assert "135M parameters" in err
    assert "forkrl: warning: the tokenizer has a chat template but model.chat_template=false" in err
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1


def test_recipe_settings_run_with_the_chat_template_and_no_warning(smollm2_dir, tmp_path, capsys):
    seen = []

    def reward(prompts, completions, answer, **fields):
        seen.extend(prompts)
        return [float(i % 2) for i in range(len(completions))]  # both outcomes in every group

    cfg = _cfg(tmp_path, "model.chat_template=true", "optim.lr=1e-6", "reward.isolate=false")
    run_dir, summary = train(cfg, reward_fn=reward)
    assert "forkrl: warning" not in capsys.readouterr().err
    assert seen and all(
        p.startswith("<|im_start|>system") and p.endswith("<|im_start|>assistant\n") for p in seen
    )
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert rows[-1]["step"] == 1 and rows[-1]["grad_norm"] > 0


def test_sampler_logprobs_equal_the_scoring_pass(smollm2_dir):
    """DESIGN's first trap on the real model (lean decode step, left padding, T, EOS)."""
    from forkrl.models.loading import load_model_and_tokenizer
    from forkrl.rollout.hf import generate
    from forkrl.tasks.arith import ArithTask
    from forkrl.tasks.files import apply_chat_template
    from forkrl.training.forward import scoring_pass

    model, tok = load_model_and_tokenizer(smollm2_dir)
    examples = ArithTask("word").examples("test", 3, seed=1234)  # prompts of different lengths
    prompts = [apply_chat_template(tok, e.prompt) for e in examples]
    ro = generate(model.eval(), tok, prompts, n=2, temperature=0.7, max_new_tokens=20, generator_seed=0)
    m = ro.response_mask
    assert (ro.attention_mask[:, : ro.prompt_len] == 0).any() and m.sum() > 60
    with torch.no_grad():
        logp, entropy = scoring_pass(
            model, ro.input_ids, ro.attention_mask, ro.prompt_len, ro.response_ids, temperature=0.7
        )
    torch.testing.assert_close(logp[m], ro.sampler_logp[m], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy[m], ro.sampler_entropy[m], rtol=1e-4, atol=1e-4)
