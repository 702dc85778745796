"""`forkrl eval` on local benchmark files: per-benchmark avg@k and pass@k equal a direct computation."""

import json
from itertools import combinations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.cli import main
from forkrl.evaluate import (
    REWARDS,
    Benchmark,
    ProblemResult,
    format_prompts,
    load_benchmarks,
    reward_scorer,
    summarize,
)
from forkrl.models.loading import DEFAULT_MODEL
from forkrl.rewards.pool import RewardPool
from forkrl.rollout.hf import generate
from forkrl.tasks.base import Example
from forkrl.tasks.files import DAPO_TEMPLATE, DataError
from forkrl.tasks.pick import PickTask, pick_reward


def _pass_at_k_by_subsets(correct: list[bool], k: int) -> float:
    """pass@k from its definition: the share of k-subsets of the samples holding a correct one."""
    subsets = list(combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dapo_row(prompt, answer, source):
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": prompt}],
        "ability": "MATH",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"index": "x"},
    }


@pytest.fixture(scope="module")
def pick_files(tmp_path_factory):
    """Two benchmarks of `pick` problems: a {problem, answer} .jsonl and a DAPO-layout .parquet."""
    tmp = tmp_path_factory.mktemp("bench")
    ex = PickTask().examples("test", 11, seed=7)
    simple = _write_jsonl(tmp / "simple.jsonl", [{"problem": e.prompt, "answer": e.answer} for e in ex[:6]])
    dapo = tmp / "dapo_layout.parquet"
    pq.write_table(pa.Table.from_pylist([_dapo_row(e.prompt, e.answer, "pickdapo") for e in ex[6:]]), dapo)
    return simple, dapo, ex


def test_cli_equals_direct_computation(pick_files, tmp_path, capsys):
    simple, dapo, ex = pick_files
    out = tmp_path / "eval"
    k, seed, batch = 4, 3, 12  # 3 problems per generation call
    argv = [
        "eval",
        "--model",
        str(DEFAULT_MODEL),
        "--data",
        str(simple),
        "--data",
        str(dapo),
        "--k",
        str(k),
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--max-new-tokens",
        "31",
        "--batch-size",
        str(batch),
        "--seed",
        str(seed),
        "--reward",
        "forkrl.tasks.pick:pick_reward",
        "--reward-workers",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)

    # Direct: the same chunks and seeds (module docstring of forkrl.evaluate), graded in this process.
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).eval()
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    benches = {"simple": ex[:6], "pickdapo": ex[6:]}  # the DAPO file is named by its data_source
    texts, correct, offset = {}, {}, 0
    for name, problems in benches.items():
        texts[name], correct[name] = [], []
        for start in range(0, len(problems), batch // k):
            chunk = problems[start : start + batch // k]
            ro = generate(
                model,
                tok,
                [e.prompt for e in chunk],
                n=k,
                temperature=1.0,
                top_p=0.9,
                max_new_tokens=31,
                generator_seed=seed + offset + start,
            )
            grades = pick_reward(None, ro.texts, [e.answer for e in chunk for _ in range(k)])
            for i in range(len(chunk)):
                texts[name].append(ro.texts[i * k : (i + 1) * k])
                correct[name].append([g == 1.0 for g in grades[i * k : (i + 1) * k]])
        offset += len(problems)

    def expected(rows):
        out = {"problems": len(rows), f"avg@{k}": sum(map(sum, rows)) / (len(rows) * k)}
        for j in (1, 2, 4):
            out[f"pass@{j}"] = sum(_pass_at_k_by_subsets(r, j) for r in rows) / len(rows)
        return out

    per = {name: expected(rows) for name, rows in correct.items()}
    pooled = expected(correct["simple"] + correct["pickdapo"])
    assert list(summary["benchmarks"]) == ["simple", "pickdapo"]
    for name, want in per.items():
        got = summary["benchmarks"][name]
        assert {key: got[key] for key in want} == pytest.approx(want), name
    assert {key: summary["overall"][key] for key in pooled} == pytest.approx(pooled)
    mean = {key: (per["simple"][key] + per["pickdapo"][key]) / 2 for key in pooled if key != "problems"}
    assert {key: summary["mean_of_benchmarks"][key] for key in mean} == pytest.approx(mean)
    assert summary["accuracy"] == pytest.approx(pooled["avg@4"]) and summary["n"] == 11
    assert 0.2 < pooled["avg@4"] < pooled["pass@2"] < 1.0  # a non-trivial signal: the test can fail
    assert summary["grader_failures"] == {"timeouts": 0, "errors": 0, "crashes": 0}

    # The results file: one line per problem, the same completions and grades.
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["benchmark"], r["index"]) for r in rows] == [("simple", i) for i in range(6)] + [
        ("pickdapo", i) for i in range(5)
    ]
    for r in rows:
        assert r["completions"] == texts[r["benchmark"]][r["index"]]
        assert r["correct"] == correct[r["benchmark"]][r["index"]]
        assert r["avg"] == pytest.approx(sum(r["correct"]) / k)
        assert r["pass@2"] == pytest.approx(_pass_at_k_by_subsets(r["correct"], 2))
    assert rows[7]["problem"] == ex[7].prompt and rows[7]["answer"] == ex[7].answer
    assert rows[7]["file"] == str(dapo)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_answers_we_control_give_the_expected_accuracy(tiny_model_dir, tmp_path, capsys):
    """Greedy: answers are the model's own greedy completions (by transformers' generate) or wrong ones."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    said = []
    for a in range(1, 40):
        prompt = f"{a}+?={a + 4} in 4,9:"
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        special = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        ids = model.generate(**enc, do_sample=False, max_new_tokens=8, **special)[
            0, enc["input_ids"].shape[1] :
        ]
        text = tok.decode(ids[ids != tok.eos_token_id], skip_special_tokens=True)
        if text.strip():
            said.append((prompt, text))
    assert len(said) >= 6
    # Benchmark "a": 2 of 3 right; benchmark "b" (DAPO layout): 1 of 3 right.
    a = [{"problem": p, "answer": t if i < 2 else "never"} for i, (p, t) in enumerate(said[:3])]
    b = [_dapo_row(p, t if i < 1 else "never", "b") for i, (p, t) in enumerate(said[3:6])]
    fa, fb = _write_jsonl(tmp_path / "a.jsonl", a), _write_jsonl(tmp_path / "b.jsonl", b)
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(fa),
        "--data",
        str(fb),
        "--max-new-tokens",
        "8",
        "--reward",
        "tests.eval_rewards:exact_match_reward",
        "--reward-workers",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["benchmarks"]["a"]["avg@1"] == pytest.approx(2 / 3)
    assert s["benchmarks"]["b"]["avg@1"] == pytest.approx(1 / 3)
    assert s["overall"]["avg@1"] == pytest.approx(3 / 6)
    assert s["mean_of_benchmarks"]["avg@1"] == pytest.approx(0.5)
    assert s["settings"]["greedy"] is True and "pass@1" in s["overall"] and "pass@2" not in s["overall"]


def test_math_verifier_through_the_pool_on_completions_we_wrote():
    ex = [Example("p", "1/2")]
    completions = [r"so \boxed{\frac{1}{2}}", "Answer: 0.5", r"\boxed{3}", "Answer: 1/2"]
    with RewardPool(REWARDS["math"], workers=1) as pool:
        assert reward_scorer(pool)(ex, completions, 4) == [1.0, 1.0, 0.0, 1.0]
    with RewardPool(REWARDS["dapo"], workers=1) as pool:  # DAPO: Answer: line, string match, +1/-1
        assert reward_scorer(pool)(ex, completions, 4) == [-1.0, -1.0, -1.0, 1.0]


def test_summary_by_hand():
    # n = 4 samples; correct counts 0, 1, 2, 4 (DAPO-style +1/-1 grades; >= 0.5 is correct).
    # avg@4 = 7/16. pass@2 per problem: 0, 1 - C(3,2)/C(4,2) = 1/2, 1 - C(2,2)/C(4,2) = 5/6, 1.
    # pass@4: 0, 1, 1, 1.
    def res(bench, c):
        return ProblemResult(
            bench,
            0,
            Example("p", "a"),
            "p",
            "f",
            ["x"] * 4,
            [1.0] * c + [-1.0] * (4 - c),
            [10] * 4,
            [False] * 3 + [True],
        )

    s = summarize([res("x", 0), res("x", 1), res("y", 2), res("y", 4)], 4)
    assert s["overall"]["avg@4"] == pytest.approx(7 / 16)
    assert s["overall"]["pass@2"] == pytest.approx((0 + 1 / 2 + 5 / 6 + 1) / 4)
    assert s["overall"]["pass@4"] == pytest.approx(3 / 4) and s["overall"]["truncated"] == 0.25
    assert s["benchmarks"]["x"]["avg@4"] == pytest.approx(1 / 8) and s["benchmarks"]["y"]["avg@4"] == 0.75
    assert s["mean_of_benchmarks"]["pass@2"] == pytest.approx(((0 + 1 / 2) / 2 + (5 / 6 + 1) / 2) / 2)
    keys = ["problems", "avg@4", "pass@1", "pass@2", "pass@4", "mean_length", "truncated"]
    assert list(s["overall"]) == keys


def test_bad_row_is_named_before_the_model_loads(pick_files, tmp_path, capsys):
    simple, _, _ = pick_files
    bad = _write_jsonl(
        tmp_path / "bad.jsonl",
        [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"}, {"problem": "3+3"}],
    )
    assert main(["eval", "--model", "/nonexistent", "--data", str(simple), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: row 3: field 'answer': missing" in err, err


def test_grouping_and_names(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    # Same stem in two folders: named folder/stem. Rows with a data_source are grouped by it.
    f1 = _write_jsonl(tmp_path / "x" / "test.jsonl", [{"problem": "1+1", "answer": "2"}])
    f2 = _write_jsonl(
        tmp_path / "y" / "test.jsonl",
        [_dapo_row("2+2", "4", "aime"), _dapo_row("3+3", "6", "math"), {"problem": "4+4", "answer": "8"}],
    )
    f3 = _write_jsonl(tmp_path / "more.jsonl", [_dapo_row("5+5", "10", "aime")])
    by_source = load_benchmarks([f1, f2, f3])
    assert [(b.name, [e.answer for e in b.examples]) for b in by_source] == [
        ("x/test", ["2"]),
        ("aime", ["4", "10"]),
        ("math", ["6"]),
        ("y/test", ["8"]),
    ]
    assert by_source[1].files == [str(f2), str(f3)]
    by_file = load_benchmarks([f1, f2, f3], group_by="file", limit=2)
    assert [(b.name, len(b.examples)) for b in by_file] == [("x/test", 1), ("y/test", 2), ("more", 1)]
    with pytest.raises(DataError, match="given twice"):
        load_benchmarks([f1, f1])


def test_prompt_templates(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+1?"}]
    dapo = Example("What is 1+1?", "2", {"messages": turns})
    bench = [Benchmark("b", [dapo, Example(DAPO_TEMPLATE.replace("{problem}", "2+2"), "4")])]
    with pytest.raises(ValueError, match="no chat template"):
        format_prompts(bench, tok, chat_template=True)
    (templated,) = format_prompts(bench, tok, dapo_template=True)
    assert templated.examples[0].prompt == DAPO_TEMPLATE.replace("{problem}", "What is 1+1?")
    assert templated.examples[1].prompt == DAPO_TEMPLATE.replace("{problem}", "2+2")  # already templated
    assert templated.problems == bench[0].problems
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    (chat,) = format_prompts(bench, tok, chat_template=True, dapo_template=True)
    assert chat.examples[0].prompt == (
        "<system>Be brief.<user>" + DAPO_TEMPLATE.replace("{problem}", "What is 1+1?") + "<assistant>"
    )


def test_builtin_task_uses_the_same_report(tmp_path, capsys):
    assert main(["eval", "--n", "8", "--out", str(tmp_path), "--no-progress"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert list(s["benchmarks"]) == ["pick"] and s["n"] == 8 and s["accuracy"] == s["overall"]["avg@1"]
    rows = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(rows) == 8 and json.loads(rows[0])["file"] == "task:pick"
