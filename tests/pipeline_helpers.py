"""Materializing the whole graph into a temporary data directory, for the asset tests."""

from pathlib import Path

import dagster as dg

from refine_af_pipeline.definitions import all_assets, all_checks, default_resources
from resources import LanguageModelResource


def smallest_run_config(**overrides) -> dict:
    """Per-asset config at the smallest sizes; `materialize` keeps the entries it selects."""
    ops = {
        "raw_instructions": {"num_prompts": 8, "classification_prompts": 1, "max_new_tokens": 64},
        "reward_scores": {"max_instructions": 8, "max_new_tokens": 32},
        "rl_refined_policy": {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "train_batch_size": 2,
                              "max_completion_length": 24},
        "rl_refined_policy_policy_beats_base_on_heldout": {"samples_per_instruction": 2, "max_new_tokens": 32,
                                                           "bootstrap_resamples": 2000},
        "instance_output_pairs": {"max_instructions": 8, "max_new_tokens": 32},
        "finetuned_model": {"epochs": 2.0, "batch_size": 4, "max_length": 128, "min_validation": 1},
        "evaluation": {"instances_per_task": 1, "max_new_tokens": 8, "bootstrap_resamples": 2000},
    }
    for key, value in overrides.items():
        ops[key] = {**ops.get(key, {}), **value}
    # The Self-Instruct branch runs with the REFINE-AF branch's settings (as in make run) unless told otherwise.
    for baseline, refine_af in (("selfinstruct_instance_pairs", "instance_output_pairs"),
                                ("selfinstruct_finetuned_model", "finetuned_model")):
        ops[baseline] = {**ops[refine_af], **overrides.get(baseline, {})}
    return ops


def materialize(data_dir: Path, model: str, run_config: dict, selection=None, batch_size: int = 8,
                raise_on_error: bool = True, stage_batch_sizes: dict | None = None) -> dg.ExecuteInProcessResult:
    resources = default_resources(data_dir)
    resources["language_model"] = LanguageModelResource(model=model, device="cpu", batch_size=batch_size,
                                                        stage_batch_sizes=stage_batch_sizes or {})
    ops = {k: {"config": v} for k, v in run_config.items() if selection is None or k in selection}
    return dg.materialize([*all_assets, *all_checks], resources=resources, run_config=dg.RunConfig(ops=ops),
                          selection=selection, raise_on_error=raise_on_error)
