"""`forkrl train model.path=... data.path=...`: a local HF checkpoint on a local data file."""

import json

import pytest
from transformers import AutoTokenizer

from forkrl.config import load_config
from forkrl.training.metrics import read_metrics
from forkrl.training.trainer import train

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


def _data(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [
        {"prompt": f"What is {a}+{b}? Answer: ", "answer": str(a + b)} for a in range(1, 7) for b in (2, 5)
    ]
    rows.append(rows[0])  # duplicate row: dropped
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("chat_template", [False, True])
def test_train_on_a_local_file_with_plain_or_chat_prompts(tiny_model_dir, tmp_path, chat_template):
    model_dir = tiny_model_dir
    if chat_template:  # a checkpoint whose tokenizer carries a chat template
        model_dir = tmp_path / "chat_model"
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        tok.chat_template = CHAT
        tok.save_pretrained(model_dir)
        for f in tiny_model_dir.iterdir():
            if not (model_dir / f.name).exists():
                (model_dir / f.name).write_bytes(f.read_bytes())
    seen = []

    def reward(prompts, completions, answer, **fields):
        seen.extend(prompts)
        return [float(len(c) % 3 == 0) for c in completions]

    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.path={_data(tmp_path)}",
            f"data.eval_path={_data(tmp_path)}",
            f"model.chat_template={chat_template}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.steps=1",
            "train.eval_n=4",
            "train.progress=false",
            "train.tensorboard=false",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=8",
            "sampling.dynamic=false",
        ],
    )
    run_dir, summary = train(cfg, reward_fn=reward)
    assert (run_dir / "final" / "model.safetensors").exists()
    assert read_metrics(run_dir)[-1]["step"] == 1
    assert (
        all(p.startswith("<user>What is") and p.endswith("<a>") for p in seen)
        if chat_template
        else all(p.startswith("What is") for p in seen)
    )
