"""TRL side of bench/vs_trl.py: one `GRPOTrainer` run, timed per step; writes a JSON result.

    python bench/_trl_side.py SETTINGS_JSON OUT_JSON      (started by bench/vs_trl.py)

GRPOConfig as TRL's paper index recommends for "Beyond the 80/20 Rule" (`top_entropy_quantile=0.2`,
`loss_type="dapo"`, `epsilon=0.2`, `epsilon_high=0.28`, `beta=0`), with one optimizer step per
generation of 128 completions in one micro-batch (`per_device_train_batch_size=128`,
`gradient_accumulation_steps=1`, `steps_per_generation=1`, `num_iterations=1`: TRL then skips its
old-log-prob pass, as forkrl skips its scoring pass by reusing the sampler's log-probs). Generation
runs inside `training_step` (`_prepare_inputs` -> `_generate_and_score_completions`), so the step
time from `on_step_begin` to `on_step_end` includes it; the dataloader only yields prompt rows.
"""

from __future__ import annotations

import time

from vs_trl import Phases, StagePeaks, child_main, peak_rss_mib, pin_threads, rss_mib, run_profiled

FIELDS = ("answer", "a", "target", "candidates")  # dataset columns the grader needs


def run(s: dict) -> dict:
    pin_threads(s["threads"])
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from forkrl.rewards import task_reward
    from forkrl.tasks.registry import get_task

    arith = s.get("task", "pick") == "arith"
    task = get_task("arith", level="add1") if arith else get_task("pick")
    n_rows = max(2000, s["prompts_per_step"] * s["steps"] * 2)
    # arith: conversational rows (TRL applies the tokenizer's chat template), as `forkrl task export`
    rows = [
        {
            "prompt": [{"role": "user", "content": e.prompt}] if arith else e.prompt,
            "answer": e.answer,
            **e.fields,
        }
        for e in task.examples("train", n_rows, s["seed"])
    ]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(s["model"], local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32, local_files_only=True)

    grade = task_reward(task)

    def pick_reward(prompts, completions, **kwargs):
        # TRL also passes trainer_state, log_extra, log_metric and completion_ids; forkrl's task_reward
        # would index them per row, so only the dataset columns go through.
        if completions and isinstance(completions[0], list):  # conversational: the assistant's text
            completions = [c[-1]["content"] for c in completions]
        return grade(prompts, completions, **{k: kwargs[k] for k in FIELDS if k in kwargs})

    phases = Phases()
    phases.install_torch_hooks()
    kept: list[float] = []
    n_mask_calls = [0]

    from forkrl.rollout.hf import torch_threads

    sample_threads = s.get("trl_sample_threads") or s["threads"]

    def sample(self, *args, **kwargs):  # TRL's sampling, at --trl-sample-threads
        with torch_threads(sample_threads):
            return GRPOTrainer._generate(self, *args, **kwargs)

    # Peak RSS per stage (sampled; see StagePeaks): TRL's sampling, and the rest of its training step
    # (the completion tokens' forward with the full-vocabulary logits, backward, optimizer).
    peaks = StagePeaks()
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(lambda *a: peaks.enter("update"))  # Trainer steps outside training_step
    register_optimizer_step_post_hook(lambda *a: peaks.exit())

    class TimedGRPO(GRPOTrainer):
        _generate = peaks.stage("generate", phases.timed("generate", sample))
        training_step = peaks.stage("update", GRPOTrainer.training_step)
        _calculate_rewards = phases.timed("reward", GRPOTrainer._calculate_rewards)
        _generate_and_score_completions = phases.timed(
            "prep_total", GRPOTrainer._generate_and_score_completions
        )
        compute_loss = phases.timed("forward", GRPOTrainer.compute_loss)

        def get_high_entropy_mask(self, entropies, mask, threshold):
            sel = super().get_high_entropy_mask(entropies, mask, threshold)
            n_mask_calls[0] += 1
            kept.append(float(sel.sum()) / max(1.0, float(mask.sum())))
            return sel

    state: dict = {"before": {}, "t0": 0.0, "c0": 0.0, "times": [], "cpu": [], "logs": {}}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            state["before"] = {"rss": rss_mib(), "peak": peak_rss_mib()}

        def on_step_begin(self, args, st, control, **kw):
            phases.new_step()
            state["t0"], state["c0"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, st, control, **kw):
            state["times"].append(time.perf_counter() - state["t0"])
            state["cpu"].append(time.process_time() - state["c0"])

        def on_log(self, args, st, control, logs=None, **kw):
            if logs and "reward" in logs:
                state["logs"][st.global_step] = dict(logs)

    config = GRPOConfig(
        output_dir=s["workdir"],
        max_steps=s["steps"],
        seed=s["seed"],
        data_seed=s["seed"],
        use_cpu=True,
        bf16=bool(s.get("bf16", False)),  # TRL's default is on (CPU: torch.autocast to bfloat16)
        fp16=False,
        # TRL's default is on; off unless asked (bench/real_shapes.py --checkpointing turns it on on both sides)
        gradient_checkpointing=bool(s.get("gradient_checkpointing", False)),
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_vllm=False,
        # batch: 16 prompts x 8 completions, all in one micro-batch, one optimizer step per generation
        num_generations=s["group_size"],
        per_device_train_batch_size=s["prompts_per_step"] * s["group_size"],
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"],
        top_p=s["top_p"],
        top_k=0,  # 0 = no top-k truncation
        # the forking-token objective
        top_entropy_quantile=s["rho"],
        loss_type="dapo",
        beta=0.0,
        epsilon=s["eps_low"],
        epsilon_high=s["eps_high"],
        mask_truncated_completions=s["mask_truncated"],
        scale_rewards="group",
        # optimizer
        optim="adamw_torch",
        learning_rate=s["lr"],
        adam_beta1=s["beta1"],
        adam_beta2=s["beta2"],
        weight_decay=s["weight_decay"],
        warmup_steps=0,
        lr_scheduler_type="constant",
        max_grad_norm=s["grad_clip"],
    )
    trainer = TimedGRPO(
        model=model,
        reward_funcs=pick_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    t0 = time.perf_counter()
    _, profile = run_profiled(s["profile"], trainer.train)
    wall = time.perf_counter() - t0

    steps = []
    for i, (t, cpu, ph) in enumerate(zip(state["times"], state["cpu"], phases.steps)):
        logs = state["logs"].get(i + 1, {})
        parts = {
            "generate": ph.get("generate", 0.0),
            "reward": ph.get("reward", 0.0),
            "prep_other": ph.get("prep_total", 0.0) - ph.get("generate", 0.0) - ph.get("reward", 0.0),
            "forward": ph.get("forward", 0.0),
            "backward": ph.get("backward", 0.0),
            "optimizer": ph.get("optimizer", 0.0),
        }
        parts["other"] = t - sum(parts.values())
        steps.append(
            {
                "time_step": t,
                "cpu_step": cpu,
                "reward": logs.get("reward", float("nan")),
                "kept_frac": kept[i] if i < len(kept) else float("nan"),
                "entropy": logs.get("entropy", float("nan")),
                "response_len_mean": logs.get("completions/mean_length", float("nan")),
                "phases": parts,
            }
        )
    prompt = (
        rows[0]["prompt"]
        if not arith
        else tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=False)
    )
    ids = tokenizer(text=[prompt])["input_ids"][0]
    return {
        "side": "trl",
        "steps": steps,
        "rss_before_train_mib": state["before"].get("rss", float("nan")),
        "peak_before_train_mib": state["before"].get("peak", float("nan")),
        "run_wall_s": wall,
        "stage_peak_rss_mib": peaks.close(),
        "profile": profile,
        "checks": {
            "top_entropy_quantile": trainer.top_entropy_quantile,
            "sample_threads": sample_threads,
            "entropy_mask_calls": n_mask_calls[0],
            "loss_type": trainer.loss_type,
            "gradient_checkpointing": config.gradient_checkpointing,
            # TRL's condition for a separate no-grad old-log-prob pass (_generate_and_score_completions)
            "old_logp_pass": config.gradient_accumulation_steps
            % (config.steps_per_generation * config.num_iterations)
            != 0,
            # plain-text prompts: no chat template and no special tokens added by TRL's tokenization
            "prompt_tokens_plain": ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
            and len(ids) == len(prompt),
            "chat_template": tokenizer.chat_template is not None,
        },
    }


if __name__ == "__main__":
    child_main(run)
