"""Evaluation: accuracy, avg@k and unbiased pass@k on a model whose answers we fix in advance."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.evaluate import evaluate_task, pass_at_k
from forkrl.tasks.base import Example


class ExactMatchTask:
    name = "exact"
    default_max_new_tokens = 8

    def grade(self, completion, example):
        return 1.0 if completion == example.answer else 0.0


class PlusMinusTask(ExactMatchTask):
    """DAPO's convention: +1 right, -1 wrong."""

    def grade(self, completion, example):
        return 1.0 if completion == example.answer else -1.0


def test_pass_at_k_hand_values():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0 and pass_at_k(5, 3, 3) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    with pytest.raises(ValueError, match="0 < k <= n"):
        pass_at_k(3, 1, 4)


@pytest.fixture(scope="module")
def controlled(tiny_model_dir):
    """Examples whose answers are the model's own greedy completions (by transformers' generate) or wrong."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [f"{a}+?={a + 7} in 7,3:" for a in range(1, 13)]
    examples = []
    for i, p in enumerate(prompts):
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[0, enc["input_ids"].shape[1] :]
        text = tok.decode(out[out != tok.eos_token_id], skip_special_tokens=True)
        # Every third example expects something the model never says.
        examples.append(Example(p, text if i % 3 else "\x00never"))
    return model, tok, examples


def test_greedy_accuracy_is_exactly_the_fraction_we_fixed(controlled):
    model, tok, examples = controlled
    res = evaluate_task(model, tok, ExactMatchTask(), examples, greedy=True, batch_size=5)
    assert res == {"accuracy": pytest.approx(8 / 12), "n": 12}


def test_accuracy_is_the_fraction_correct_not_the_mean_grade(controlled):
    model, tok, examples = controlled
    # 8 right (+1) and 4 wrong (-1): the mean grade is 4/12, the fraction of correct answers 8/12.
    res = evaluate_task(model, tok, PlusMinusTask(), examples, greedy=True, batch_size=5)
    assert res == {"accuracy": pytest.approx(8 / 12), "n": 12}
    res = evaluate_task(model, tok, PlusMinusTask(), examples, greedy=False, k=2, temperature=1e-4)
    assert res["accuracy"] == pytest.approx(8 / 12) and res["pass@2"] == pytest.approx(8 / 12)


def test_sampled_avg_and_pass_at_k(controlled):
    model, tok, examples = controlled
    # At T -> 0 sampling is greedy: every sample of a right example is right, so avg@4 = pass@4 = 8/12.
    res = evaluate_task(
        model, tok, ExactMatchTask(), examples, greedy=False, k=4, temperature=1e-4, batch_size=7
    )
    assert res["accuracy"] == pytest.approx(8 / 12) and res["pass@4"] == pytest.approx(8 / 12)
    # At T = 1 the average is over every sample, and pass@k >= avg@k always.
    torch.manual_seed(0)
    res = evaluate_task(model, tok, ExactMatchTask(), examples, greedy=False, k=4, temperature=1.0)
    assert 0.0 <= res["accuracy"] <= res["pass@4"] <= 1.0
