"""One line per column of the pipeline's tables, shown in the UI's Columns table of each asset.

Keyed by column name: a name means the same thing in every table that has it (a difference in
scope, such as a step's mean against one instance's value, is said in the line).
"""

_COMPONENTS = {
    "preference": "rating by the preference judge (offline default: the base LLM's 1-10 rating mapped to 0-1; reward model: raw logit)",
    "naturalness": "naturalness score (offline default: exp of the mean token log-likelihood of the output, 0-1; UniEval: P(Yes))",
    "coherence": "coherence score (offline default: cosine similarity of request and output embeddings, -1 to 1; UniEval: P(Yes))",
    "understandability": "understandability score (offline default: Flesch reading ease clipped to 0-100, scaled to 0-1; UniEval: P(Yes))",
    "learned_reward": "the learned reward: a Bradley-Terry score on MiniLM embeddings fitted to prefer human seed instances "
    "(reward_model; unbounded, higher = better)",
}

_OPERATIONS = ("breadth", "add_constraint", "deepen", "concretize", "increase_reasoning", "complicate_input")

_MODELS = {
    "base": "base model",
    "self_instruct": "Self-Instruct-tuned model",
    "refine_af": "REFINE-AF-tuned model",
    "best_of_n": "best-of-N-tuned model",
    "teams_rl": "TeaMs-RL-tuned model",
}

COLUMN_DESCRIPTIONS: dict[str, str] = {
    # identity and provenance
    "id": "seed task id from the seed file",
    "name": "seed task name from the seed file",
    "source": "file the seed pool was read from (built-in or the configured seed_file)",
    "instances": "number of input/output instances the seed task has",
    "first_input": "input of the seed task's first instance (empty when it takes none)",
    "first_output": "output of the seed task's first instance",
    "instruction_id": "id of the generated instruction: <plan id prefix>-<prompt index>-<position in the response>",
    "instance_id": "id of one generated instance: <instruction id>-<sample index>",
    "instruction": "the task instruction text",
    "run_id": "Dagster run that wrote the row",
    "source_run_id": "run of raw_instructions that generated the candidate",
    "model_id": "model that generated or answered, by the name it was served as (in process: Hugging Face id or "
    "directory, the embedded model marked as such; vllm: plus the adapter; openai: the served model name)",
    "backend": "generation engine that produced the row: transformers, vllm or openai",
    "engine_version": "version of that engine (transformers x.y, vllm x.y, or what the server reports)",
    "policy_served_model": "the RL policy as it was served (model_id of the policy's rows)",
    "base_model_id": "base model the adapter was trained on",
    "adapter_path": "directory of the LoRA adapter this row belongs to (null: the base model)",
    "policy_adapter": "LoRA adapter of the RL policy that wrote the instance (null: the base model, the Self-Instruct baseline)",
    "sampling_params": "sampling settings of the generation as JSON (temperature, top_p, max_new_tokens, seed ...)",
    "settings": "the stage's config for this run as JSON",
    "llm_queries": "model queries of the run that wrote the row, by role, as JSON (the same on each of its rows; "
    "the query ledger reads them)",
    "scorers": "name and version of the scorer behind each feedback component, as JSON",
    # bootstrap
    "prompt_index": "index of the bootstrap prompt in its plan (0-based)",
    "prompt_example_ids": "ids of the 8 example instructions the prompt showed, as a JSON list (seed ids and instruction ids)",
    "prompt_type": "bootstrap prompt variant: general or classification-only",
    "raw_response": "the model's whole continuation of the bootstrap prompt",
    "response_tokens": "tokens the model generated for the prompt",
    "hit_token_limit": "whether the response (a rewrite, an answer) stopped at max_new_tokens",
    "dropped_truncated_item": "whether a last list item cut by the token limit was dropped",
    "position_in_response": "index of the instruction within its response's list (0-based)",
    "parse_status": "ok, or why the text did not parse (bootstrap: empty, unparseable; instances: missing_output, empty_output)",
    # de-duplication
    "decision": "kept or rejected",
    "reason": "why a candidate was rejected (rouge_l_above_threshold, too_short, blacklisted:<word>, unparseable_response ...); null when kept",
    "max_rouge_l": "highest ROUGE-L F-measure against the seeds and the instructions kept before it (0-1; rejected above "
    "the threshold, 0.7 by default); null where an earlier filter decided",
    "most_similar_instruction": "the instruction that gave max_rouge_l",
    "is_classification": "whether the task is classification (seeds: from the file; kept instructions: the model's label, P(Yes) > 0.5)",
    "is_classification_p": "the model's P(Yes) to 'Is it classification?' (0-1)",
    "classification_model_id": "model that labelled is_classification",
    # instances and rewards
    "input": "the instance's input (empty for tasks without one)",
    "output": "the instance's output",
    "generation": "the model's raw text for the instance, before parsing",
    "generation_tokens": "tokens the model generated for the instance (TeaMs-RL: for the rewrite or the answer)",
    "gate_reason": "why the instance gate rejected the instance (missing_output, empty_output, output_cut_at_token_limit, "
    "degenerate_repetition, output_copies_input, output_copies_instruction, output_not_a_named_label; "
    "refine_af_pipeline/feedback/gates.py); null when it passed",
    **_COMPONENTS,
    **{f"{c}_scorer": f"scorer name and version behind {c}" for c in _COMPONENTS},
    "reward": "combined reward: bias + sum of weight x standardised component (the gate_reward, -3 by default, when the instance gate rejected it); in rl_refined_policy "
    "the mean of the step's completions; in the teams_* tables the reviewer's reward of the rewrite: P(differs), "
    "0 where a rule fired",
    # reward standardisation (one row, from the base model's gate-passing instances in reward_scores)
    **{f"mean_{c}": f"mean raw {c} of the base model's instances that passed the instance gate" for c in _COMPONENTS},
    **{f"std_{c}": f"standard deviation of raw {c} over those instances (1 when constant)" for c in _COMPONENTS},
    **{f"weight_{c}": f"weight of the standardised {c} in the combined reward" for c in _COMPONENTS},
    "bias": "bias of the combined reward",
    "weights_source": "where the weights come from: config, or calibration:<ratings file>",
    "standardised_instances": "base-model instances the means and spreads were computed over",
    "keep": "whether the pair (teams_evolved_instructions: the instruction) passed every filter and enters the next stage",
    "filter_reason": "why the row was filtered out (a gate reason, conflicting_outputs_for_same_input; evolved instructions: a "
    "reviewer rule, no_information_gain, a Self-Instruct filter, near_duplicate); null when kept",
    # RL training log
    "step": "optimizer step of the RL run (1-based); in the teams_* tables the position of the operation in its chain (1-based)",
    "reward_std": "standard deviation of the combined reward over the step's completions",
    "kl": "mean per-token KL divergence to the base model (TRL's estimate; NaN when beta is 0); teams_operation_policy: "
    "mean KL of the instructor's action distribution from before the update, over the states its rollout visited",
    "loss": "trainer loss of the step",
    "entropy": "mean per-token entropy of the policy on its completions (nats); teams_operation_policy: mean entropy of "
    "the instructor's action distribution over the states its rollout visited, after the update (nats)",
    "completion_length": "mean completion length of the step (tokens)",
    "clipped_share": "share of the step's completions cut at max_completion_length (0-1)",
    "gate_failure_share": "share of the step's completions the instance gate rejected (0-1)",
    "repeat_share": "mean share of repeated word 3-grams within a completion (0 = none, near 1 = a looped phrase)",
    **{f"{c}_mean": f"mean raw {c} over the step's completions that passed the instance gate" for c in _COMPONENTS},
    "heldout_share": "share of kept instructions held out from RL (the share actually used, after min_heldout)",
    # held-out comparison
    "samples": "instances each model wrote for the held-out instruction",
    "base_reward": "mean combined reward of the base model's instances for the instruction",
    "policy_reward": "mean combined reward of the RL policy's instances for the instruction",
    "reward_difference": "policy_reward - base_reward",
    "outcome": "win, tie (within 1e-3) or loss of the policy on this instruction",
    "base_gate_failures": "base model instances the instance gate rejected",
    "base_passed": "base model instances that passed the instance gate",
    "policy_passed": "RL policy instances that passed the instance gate",
    "base_passed_reward_sum": "sum of the combined reward over the base model's instances that passed the gate",
    "policy_passed_reward_sum": "sum of the combined reward over the RL policy's instances that passed the gate",
    "policy_gate_failures": "policy instances the instance gate rejected",
    "base_repeat_share": "mean repeated-3-gram share of the base model's instances (0-1)",
    "policy_repeat_share": "mean repeated-3-gram share of the policy's instances (0-1)",
    **{f"base_{c}": f"mean raw {c} of the base model's instances" for c in _COMPONENTS},
    **{f"policy_{c}": f"mean raw {c} of the policy's instances" for c in _COMPONENTS},
    "base_example": "the first instance the base model wrote",
    "policy_example": "the first instance the policy wrote",
    # supervised fine-tuning
    "epoch": "epoch of supervised fine-tuning (0 = before the first step)",
    "steps": "optimizer steps so far",
    "step_losses": "training loss of each optimizer step in the epoch",
    "train_loss": "mean training loss of the epoch's steps (epoch 0: measured on the training pairs), nats per response token",
    "validation_loss": "loss on the validation pairs after the epoch, nats per response token (NaN without validation pairs)",
    "train_examples": "pairs trained on",
    "validation_examples": "pairs held out for validation",
    "validation_instruction_ids": "instruction ids whose pairs form the validation slice, as a JSON list",
    "train_table": "table the training pairs came from",
    # evaluation
    "task": "evaluation task (the task file's name)",
    "model": "evaluated model: base, self_instruct, refine_af, best_of_n or teams_rl",
    "replicate": "replicate of the branch's instance draw and SFT (0-based; each its own sampling and trainer seeds)",
    "rouge_l": "ROUGE-L F-measure of the answer's first line against the best reference (0-1; per task: the mean over instances)",
    "log_likelihood": "mean over the task's instances of the best reference's mean per-token log-likelihood (nats, higher is better)",
    "reference_log_likelihood": "mean per-token log-likelihood of the best reference after the evaluation prompt (nats)",
    "n_instances": "instances evaluated for the task",
    **{f"rouge_l_{m}": f"mean ROUGE-L of the {name} on the task (0-1)" for m, name in _MODELS.items()},
    **{
        f"log_likelihood_{m}": f"mean reference log-likelihood of the {name} on the task (nats per token)"
        for m, name in _MODELS.items()
    },
    "prediction": "the model's greedy answer",
    "references": "the task instance's reference outputs, as a JSON list",
    "candidate": "model compared (the first of the pair)",
    "reference": "model it is compared with",
    "n_tasks": "tasks compared",
    "wins": "tasks where the candidate's mean is higher",
    "ties": "tasks where the two means are equal (ROUGE-L: exactly; log-likelihood: within 1e-4)",
    "losses": "tasks where the candidate's mean is lower",
    "win_share": "wins / n_tasks (0-1)",
    "tie_share": "ties / n_tasks (0-1)",
    "loss_share": "losses / n_tasks (0-1)",
    "win_share_ci_low": "lower bound of the win share's bootstrap confidence interval over tasks",
    "win_share_ci_high": "upper bound of the win share's bootstrap confidence interval over tasks",
    "mean_difference": "mean over tasks of candidate minus reference (the metric's unit)",
    "mean_difference_ci_low": "lower bound of the mean difference's bootstrap confidence interval",
    "mean_difference_ci_high": "upper bound of the mean difference's bootstrap confidence interval",
    "confidence": "confidence level of the intervals (0.95)",
    "resamples": "bootstrap resamples behind the intervals",
    "task_dir": "folder of the evaluation tasks, or built-in",
    # exports
    "dataset": "exported dataset: refine_af, self_instruct or teams_rl",
    "format": "file format: alpaca_json, jsonl, parquet or hf_dataset",
    "path": "path of the exported file or folder",
    "rows": "records in the file",
    "source_table": "table the records came from",
    # crash-resume ledger (generation_plans, generation_plan_batches)
    "plan_id": "id of a generation plan (the run that made it)",
    # TeaMs-RL
    "seed_id": "id of the seed task the chain started from",
    "seed_instruction": "the seed task's instruction",
    "operation": "the instruction operation applied at this step (breadth, add_constraint, deepen, concretize, "
    "increase_reasoning, complicate_input)",
    "before": "the instruction the operation was applied to",
    "after": "the rewritten instruction (first line of the rewriter's reply, cleaned)",
    "previous_instruction": "the instruction the operation was applied to",
    "p_differs": "the reviewer model's P(Yes) that the rewrite adds something; null where a rule decided",
    "rule": "the reviewer rule that zeroed the reward (empty_or_punctuation, refusal, identical, echo_of_request, "
    "leaked_prompt_words, copied_example, near_identical); null when the model judged",
    "rewrite_cached": "whether the rewrite came from the call cache (same model, prompt, sampling and seed)",
    "review_cached": "whether the judgement came from the call cache",
    "reviewer_version": "the reviewer's method, model, question and rules hash",
    "episode_env": "index of the episode slot in the batched environment",
    "update": "TRPO update of the instructor (1-based)",
    "episodes": "episodes in the update's rollout",
    "transitions": "operations applied in the update's rollout",
    "mean_reward": "mean reviewer reward over the update's operations",
    "rule_zero_share": "share of the update's operations a reviewer rule zeroed (0-1)",
    **{f"share_{o}": f"share of the update's operations that were {o}" for o in _OPERATIONS},
    **{
        f"start_probability_{o}": f"the instructor's probability of {o} as the first operation, after the update"
        for o in _OPERATIONS
    },
    "policy_path": "the instructor's weights (sb3-contrib TRPO zip) in the artifact store",
    "arm": "how operations were chosen: policy (the learned instructor, sampled), uniform (random, WizardLM's "
    "choice) or fixed:<operation> (the operation with the best training reward)",
    # query ledger
    "stage": "asset whose step made the queries",
    "branch": "the arm of the comparison: self_instruct, refine_af, best_of_n, teams_rl (ledger: a+b marks a stage several arms share)",
    "purpose": "data (the branch needs it), diagnostic (a check or comparison) or evaluation",
    "role": "what the model did: generator, judge, rewriter, reviewer, expert, evaluated, audit",
    "queries": "model queries: prompts generated from plus texts scored",
    "asset": "generation stage that owns the plan",
    "status": "plan status: open, finished or abandoned",
    "n_batches": "batches in the plan",
    "created_at": "when the plan was made (UTC)",
    "finished_at": "when the plan's last batch was committed (UTC)",
    "finished_by_run_id": "run that committed the plan's last batch",
    "batch_index": "index of the batch in its plan (0-based)",
    "inputs": "the batch's inputs as JSON: the sampled prompts or the chosen instructions",
    "committed_at": "when the batch's rows were committed (UTC)",
    "committed_by_run_id": "run that committed the batch",
    "rows_written": "rows the batch wrote",
    # best-of-N, the equal SFT draws, the audit
    "candidate_index": "which of the instance's best-of-N candidates the row is (0 in the other branches: one candidate)",
    "chosen": "whether the row is its instance's chosen candidate (the highest training reward; always true with one candidate)",
    "slice": "which part of a split the row is in: train, validation (SFT draws) or heldout (reward model pairs)",
    "draw_rank": "position of the pair in its branch's stable-hash draw order (0-based)",
    "kept_pairs": "kept pairs the branch had to draw from",
    "train_pairs": "training pairs of the branch",
    "validation_pairs": "validation pairs of the branch",
    "target_train": "training pairs every branch should get (sft_pairs, or the smallest branch's count)",
    "target_validation": "validation pairs every branch should get (the smallest branch's count)",
    "shared_train_instructions": "training instructions every other branch on the shared pool trains on too",
    "audit": "the audit judge's score: mean per-token log-probability gain of the output from the instruction, given "
    "the input (PMI, nats/token; higher = the output answers this instruction)",
    "audit_judge": "the audit judge: method and model",
    "mean_audit": "mean audit score over the branch's training pairs",
    "mean_training_reward": "mean training reward of the branch's training pairs (null for TeaMs-RL: its answers are not scored)",
    "paired_instructions": "distinct instructions both branches trained on in some replicate (the comparison's items)",
    "mean_audit_difference": "mean over paired instructions of candidate minus reference audit score",
    "base_audit": "mean audit score of the base model's gate-passing instances for the instruction",
    "policy_audit": "mean audit score of the RL policy's gate-passing instances for the instruction",
    "audit_difference": "policy_audit - base_audit (null when a side has no gate-passing instance)",
    # the learned reward
    "negative_kind": "what the human output is preferred over: base_model (its answer), echo (the input or instruction), "
    "other_task (another seed task's output), cut (the output's first half); all: every kind",
    "preferred": "the preferred output (the human-written one)",
    "rejected": "the output it is preferred over",
    "preferred_reward": "learned reward of the preferred output",
    "rejected_reward": "learned reward of the rejected output",
    "correct": "the learned reward ranks the preferred output strictly higher",
    "length_correct": "the length-only baseline ranks the preferred output strictly higher",
    "self_rating_correct": "the base model's 1-10 self-rating ranks the preferred output strictly higher (held-out pairs only)",
    "audit_correct": "the audit judge ranks the preferred output strictly higher (held-out pairs only; null: an empty output)",
    "model_dir": "folder of the fitted reward model in the artifact store",
    "reward_model_version": "the learned reward's method, embedder and fitting run",
    "heldout_pairs": "held-out preference pairs",
    "length_baseline": "pairwise accuracy of the length-only baseline on held-out pairs (0-1)",
    "self_rating": "pairwise accuracy of the base model's self-rating on held-out pairs (0-1)",
    # the verdict
    "question": "the question the row answers",
    "metric": "what is compared (evaluation: rouge_l, log_likelihood; the verdict: also reward, audit, reviewer reward)",
    "judge": "what produced the numbers compared",
    "effect": "mean of candidate minus reference over the items and seeds",
    "ci95_low": "lower end of the 95% bootstrap CI of the effect (seeds and items resampled together)",
    "ci95_high": "upper end of the 95% bootstrap CI of the effect",
    "n_items": "items compared (tasks, instructions or seed tasks)",
    "n_seeds": "replicates (seeds) compared",
    "margin": "smallest effect that matters for this metric",
    "min_detectable_difference": "effect the comparison finds 80% of the time at 5% (2.8 standard errors)",
    "per_seed_effects": "the effect within each seed (replicate) alone, in seed order, separated by ' / ' (the pooled effect is their item-weighted mean)",
    "answer": "yes / no / cannot tell, by the rule",
    "note": "what else to know to read the row",
    "answer_rule": "how the answer follows from the CI and the margin",
    # TeaMs-RL state and headroom
    "state": "the instructor's state, coarsely: start, or after <operation> (rejected when that rewrite was)",
    "observation": "the full state vector the instructor read (teams/state.py)",
    "state_transitions": "training transitions in the state",
    "best_operation": "operation with the best mean reward in the state (at least 3 transitions)",
    "best_mean_reward": "its mean reward",
    **{f"mean_reward_{o}": f"mean reward of {o} in the state (null: fewer than 3 transitions)" for o in _OPERATIONS},
}


def column_description(column: str) -> str:
    """The column's one-line description, empty for a column this table does not know."""
    return COLUMN_DESCRIPTIONS.get(column, "")
