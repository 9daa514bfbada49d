"""Stage 5: the paper's comparison. Base, Self-Instruct-tuned and REFINE-AF-tuned models answer
held-out tasks in the Super-NaturalInstructions format zero-shot; ROUGE-L per task and model, and
the share of tasks where REFINE-AF beats Self-Instruct with a bootstrap CI."""


import json
from collections import Counter

import dagster as dg
import polars as pl

from refine_af_pipeline.evaluation import best_rouge_l, evaluation_items, first_line, load_tasks, mean_by_task
from refine_af_pipeline.generation import SamplingParams, generate
from refine_af_pipeline.plots import bar_chart_png
from refine_af_pipeline.prompts import evaluation_prompt
from refine_af_pipeline.task_comparison import TaskComparison, compare_over_tasks, mean_per_model
from resources import LanguageModelResource, Warehouse

from .config_types import NonNegativeInt, PositiveInt
from .metadata import markdown_table, png_markdown, progress_logger, table_metadata
from .shared import latest_artifact

# Model label in the tables -> the fine-tuning asset whose adapter it is (None: the base model).
EVALUATED_MODELS = {"base": None, "self_instruct": "selfinstruct_finetuned_model", "refine_af": "finetuned_model"}
# (candidate, reference): the paper's comparison first, then each tuned model against the base.
COMPARISONS = [("refine_af", "self_instruct"), ("refine_af", "base"), ("self_instruct", "base")]
CHECK_NAME = "refine_af_beats_self_instruct"


class EvaluationConfig(dg.Config):
    task_dir: str | None = None  # a folder of SuperNI-format task files; the built-in set if unset
    instances_per_task: NonNegativeInt = 2  # 0 = all
    max_new_tokens: PositiveInt = 24
    bootstrap_resamples: PositiveInt = 10_000
    seed: int = 0  # of the bootstrap


@dg.asset(group_name="evaluation", kinds={"duckdb", "pytorch"}, pool="gpu",
          deps=["finetuned_model", "selfinstruct_finetuned_model"],
          check_specs=[dg.AssetCheckSpec(CHECK_NAME, asset="evaluation", description=(
              "Warns (never fails) unless the REFINE-AF model wins more held-out tasks than it loses "
              "against the Self-Instruct model."))])
def evaluation(context: dg.AssetExecutionContext, config: EvaluationConfig, warehouse: Warehouse,
               language_model: LanguageModelResource) -> dg.MaterializeResult:
    """Each model answers every evaluation instance zero-shot in the SuperNI layout (definition,
    input, "Output:"), greedy; the first line of the answer is scored by ROUGE-L against each
    reference, best one counts. One row per (task, model) here, one per (instance, model) in
    evaluation_predictions, the pairwise task comparisons in evaluation_summary."""
    tasks = load_tasks(config.task_dir)
    items = evaluation_items(tasks, config.instances_per_task)
    # Plain text prompts: the SuperNI layout itself ends with "Output:".
    prompts = [evaluation_prompt(t.definition, inst.input) for t, inst in items]
    params = SamplingParams(max_new_tokens=config.max_new_tokens, do_sample=False)
    counts = Counter(t.name for t, _ in items)
    task_rows, prediction_rows, by_model = [], [], {}
    for label, adapter_table in EVALUATED_MODELS.items():
        adapter = latest_artifact(warehouse, adapter_table) if adapter_table else None
        model, tokenizer, source, _ = language_model.load(adapter=adapter)
        # Only the first line is scored, so a row may stop there (same answers, fewer tokens).
        gens = generate(model, tokenizer, prompts, params, language_model.batch_size, 0,
                        progress_logger(context, f"evaluation/{label}"), stop_after_first_line=True)
        answers = [first_line(g.text) for g in gens]
        scores = [best_rouge_l(a, inst.references) for a, (_, inst) in zip(answers, items)]
        by_model[label] = mean_by_task(items, scores)
        task_rows += [dict(task=name, model=label, model_id=source.model_id, adapter_path=adapter, rouge_l=score,
                           n_instances=counts[name], run_id=context.run_id) for name, score in by_model[label].items()]
        prediction_rows += [dict(task=t.name, instance_id=inst.id, model=label, prediction=a, rouge_l=s,
                                 references=json.dumps(list(inst.references)), run_id=context.run_id)
                            for (t, inst), a, s in zip(items, answers, scores)]
        del model
    comparisons = [compare_over_tasks(by_model[c], by_model[r], c, r, config.bootstrap_resamples, seed=config.seed)
                   for c, r in COMPARISONS]
    df = pl.DataFrame(task_rows, schema_overrides={"adapter_path": pl.Utf8})
    summary = pl.DataFrame([{**c.as_dict(), "task_dir": config.task_dir or "built-in", "run_id": context.run_id}
                            for c in comparisons])
    warehouse.write_table("evaluation", df)
    warehouse.write_table("evaluation_predictions", pl.DataFrame(prediction_rows))
    warehouse.write_table("evaluation_summary", summary)
    headline = comparisons[0]
    means = mean_per_model(by_model)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, ["task", "model", "rouge_l"]),
            **{f"mean_rouge_l_{m}": v for m, v in means.items()},
            **_headline_metadata(headline),
            "tasks": len(tasks),
            "instances_per_task": len(items) // max(len(tasks), 1),
            "summary": dg.MetadataValue.md(markdown_table(_summary_view(summary))),
            "per_task": dg.MetadataValue.md(markdown_table(_per_task_view(by_model))),
            "chart": png_markdown(_chart(by_model, means), "ROUGE-L per task"),
        },
        check_results=[dg.AssetCheckResult(
            check_name=CHECK_NAME, passed=headline.wins > headline.losses, severity=dg.AssetCheckSeverity.WARN,
            metadata={**_headline_metadata(headline),
                      "rule": "passes when REFINE-AF wins more tasks than it loses (ties count for neither)"})],
    )


def _headline_metadata(c: TaskComparison) -> dict:
    return {
        "share_tasks_refine_af_beats_self_instruct": c.win_share,
        "share_ci95_low": c.win_share_ci_low,
        "share_ci95_high": c.win_share_ci_high,
        "wins_ties_losses": f"{c.wins}/{c.ties}/{c.losses}",
        "ties": c.ties,
        "mean_difference_refine_af_minus_self_instruct": c.mean_difference,
        "mean_difference_ci95": f"[{c.mean_difference_ci_low:.4f}, {c.mean_difference_ci_high:.4f}]",
    }


def _summary_view(summary: pl.DataFrame) -> pl.DataFrame:
    return summary.select("candidate", "reference", "n_tasks", "wins", "ties", "losses", "win_share",
                          "win_share_ci_low", "win_share_ci_high", "mean_difference", "mean_difference_ci_low",
                          "mean_difference_ci_high")


def _per_task_view(by_model: dict[str, dict[str, float]]) -> pl.DataFrame:
    tasks = sorted(by_model["base"])
    return pl.DataFrame({"task": tasks, **{m: [by_model[m][t] for t in tasks] for m in EVALUATED_MODELS}})


def _chart(by_model: dict[str, dict[str, float]], means: dict[str, float]) -> bytes:
    tasks = sorted(by_model["base"])
    return bar_chart_png([*tasks, "MEAN"], {m: [*(by_model[m][t] for t in tasks), means[m]] for m in EVALUATED_MODELS},
                         "ROUGE-L per held-out task: base, Self-Instruct, REFINE-AF")
