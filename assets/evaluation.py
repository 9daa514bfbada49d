"""Stage 5: the paper's comparison. Base, Self-Instruct-, REFINE-AF-, best-of-N- and TeaMs-RL-tuned models answer
held-out tasks in the Super-NaturalInstructions format zero-shot; ROUGE-L and the reference
log-likelihood per task and model, and for each pair of models and each metric the share of tasks
one beats the other with a bootstrap CI."""

import dagster as dg
import polars as pl

from refine_af_pipeline.evaluation.conclusion import RULE, Conclusion, ci_conclusion
from refine_af_pipeline.evaluation.model_scores import (
    Items,
    means_over_replicates,
    prediction_rows,
    score_model,
    task_rows,
)
from refine_af_pipeline.evaluation.task_comparison import mean_per_model, summary_rows, tasks_differing
from refine_af_pipeline.evaluation.tasks import EvaluationSettings, evaluation_items, load_tasks
from refine_af_pipeline.llm.backend import SamplingParams
from refine_af_pipeline.llm.query_count import CountedModel, QueryCounter
from refine_af_pipeline.plots import bar_panels_png
from resources import LanguageModelResource, Warehouse
from resources.warehouse import insert_rows

from . import groups
from .columns import declare
from .finetune import BESTOFN_FINETUNED, FINETUNED, SELFINSTRUCT_FINETUNED, TEAMS_FINETUNED
from .metadata import metadata_table, peak_memory, png_markdown, progress_logger, table_metadata
from .shared import adapter_folders, provenance_columns

EVALUATION, PREDICTIONS, SUMMARY = "evaluation", "evaluation_predictions", "evaluation_summary"
# Model label in the tables -> the fine-tuning asset whose adapter it is (None: the base model).
EVALUATED_MODELS = {
    "base": None,
    "self_instruct": SELFINSTRUCT_FINETUNED,
    "refine_af": FINETUNED,
    "best_of_n": BESTOFN_FINETUNED,
    "teams_rl": TEAMS_FINETUNED,
}
_MODEL_NAMES = {
    "base": "base model",
    "self_instruct": "Self-Instruct-tuned model",
    "refine_af": "REFINE-AF-tuned model",
    "best_of_n": "best-of-N-tuned model",
    "teams_rl": "TeaMs-RL-tuned model",
}
_TASK = "evaluation task (the task file's name)"
_MODEL = f"evaluated model: {', '.join(EVALUATED_MODELS)}"
COLUMNS = declare(
    {
        EVALUATION: {
            "task": _TASK,
            "model": _MODEL,
            "adapter_path": "directory of the evaluated LoRA adapter (null: the base model)",
            "rouge_l": "mean over the task's instances of the answer's ROUGE-L F-measure against the best reference "
            "(0-1)",
            "log_likelihood": "mean over the task's instances of the best reference's mean per-token log-likelihood "
            "(nats, higher is better)",
            "n_instances": "instances evaluated for the task",
        },
        PREDICTIONS: {
            "task": _TASK,
            "instance_id": "id of the evaluation instance in its task",
            "model": _MODEL,
            "prediction": "the model's greedy answer, its first line",
            "rouge_l": "ROUGE-L F-measure of the answer against the best reference (0-1)",
            "reference_log_likelihood": "mean per-token log-likelihood of the best reference after the evaluation "
            "prompt (nats)",
            "references": "the task instance's reference outputs, as a JSON list",
        },
        SUMMARY: {
            "metric": "what is compared: rouge_l or log_likelihood (the task means, over the model's replicates)",
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
        },
        f"{EVALUATION}/per_task": {
            "task": _TASK,
            **{f"rouge_l_{m}": f"mean ROUGE-L of the {name} on the task (0-1)" for m, name in _MODEL_NAMES.items()},
            **{
                f"log_likelihood_{m}": f"mean reference log-likelihood of the {name} on the task (nats per token)"
                for m, name in _MODEL_NAMES.items()
            },
        },
    }
)
# (candidate, reference): the paper's comparison first, then REFINE-AF against the best-of-N control,
# each tuned model against the base, best-of-N against Self-Instruct, TeaMs-RL against the others.
TUNED = [a for a in EVALUATED_MODELS.values() if a]
COMPARISONS = [
    ("refine_af", "self_instruct"),
    ("refine_af", "best_of_n"),
    ("refine_af", "base"),
    ("self_instruct", "base"),
    ("best_of_n", "base"),
    ("best_of_n", "self_instruct"),
    ("teams_rl", "base"),
    ("teams_rl", "self_instruct"),
    ("teams_rl", "refine_af"),
]
CHECK_NAME = "refine_af_beats_self_instruct"


# A tuned model "differs" from the base on a task when its mean reference log-likelihood moved by
# more than this many nats per token (reported in the metadata; a tie in the summary is far
# smaller: batching noise, task_comparison.LOG_LIKELIHOOD_TIE_TOLERANCE).
LOG_LIKELIHOOD_MARGIN = 0.01
METRICS = ("rouge_l", "log_likelihood")


class EvaluationConfig(dg.Config, EvaluationSettings):
    """Run config of `evaluation`: the fields of EvaluationSettings (refine_af_pipeline/evaluation/tasks.py)."""


@dg.multi_asset(
    name=EVALUATION,
    group_name=groups.EVALUATION,
    pool="gpu",
    can_subset=False,
    specs=[
        dg.AssetSpec(
            EVALUATION,
            deps=TUNED,
            kinds={"duckdb", "pytorch"},
            description=(
                "One row per (held-out task, model): the task's mean ROUGE-L of the first answer line and mean "
                "reference log-likelihood, for the base, Self-Instruct-, REFINE-AF-, best-of-N- and "
                "TeaMs-RL-tuned models."
            ),
        ),
        dg.AssetSpec(
            PREDICTIONS,
            deps=TUNED,
            kinds={"duckdb"},
            description=(
                "One row per (evaluation instance, model): the greedy answer's first line, its ROUGE-L against "
                "the best reference, the best reference's mean per-token log-likelihood, the references."
            ),
        ),
        dg.AssetSpec(
            SUMMARY,
            deps=TUNED,
            kinds={"duckdb"},
            description=(
                "For each pair of models and each metric (ROUGE-L, log-likelihood): wins/ties/losses over tasks, "
                "the win share with its bootstrap 95% CI, the mean paired difference with its CI."
            ),
        ),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            CHECK_NAME,
            asset=SUMMARY,
            description=(
                "Warns (never fails) unless the REFINE-AF model beats the Self-Instruct model by ROUGE-L on the "
                "held-out tasks: the low end of the bootstrap 95% CI of the mean paired difference over tasks must "
                "be above 0; otherwise it says 'cannot tell' (or 'no') with the effect, its CI and n."
            ),
        )
    ],
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    warehouse: Warehouse,
    language_model: LanguageModelResource,
):
    """Each model answers every evaluation instance zero-shot in the SuperNI layout (definition,
    input, "Output:"), greedy; the first line of the answer is scored by ROUGE-L against each
    reference, best one counts. Each model also reads every reference after the same prompt: the
    mean per-token log-likelihood of the best reference, which moves with the model even when the
    greedy answer does not. The three tables are written in one transaction."""
    tasks = load_tasks(config.task_dir)
    items = evaluation_items(tasks, config.instances_per_task)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, do_sample=False)
    adapters = _adapters(warehouse)
    # One copy of the base weights; the tuned models are its LoRA adapters.
    queries = QueryCounter()
    models = {key: queries.wrap(m, "evaluated") for key, m in language_model.open_models(adapters).items()}
    for model in models.values():
        model.require("continuation_logprobs", "evaluation (the reference log-likelihood)")
    task_table, prediction_table, by_replicate = _score_models(
        context, config, language_model, models, adapters, items, params
    )
    del models
    # The pairwise summary reads each model's task means averaged over its replicates.
    by_metric = means_over_replicates(by_replicate)
    rows = summary_rows(by_metric, COMPARISONS, config.bootstrap_resamples, config.seed)
    # This run's model queries go on every row of the evaluation table, for the query ledger.
    df = pl.DataFrame(task_table, schema_overrides={"adapter_path": pl.Utf8}).with_columns(
        pl.lit(queries.as_json()).alias("llm_queries")
    )
    summary = pl.DataFrame([{**r, "task_dir": config.task_dir or "built-in", "run_id": context.run_id} for r in rows])
    predictions = pl.DataFrame(prediction_table)
    with warehouse.transaction() as conn:
        for table, frame in ((EVALUATION, df), (PREDICTIONS, predictions), (SUMMARY, summary)):
            insert_rows(conn, table, frame, mode="replace")
    headline = _comparison(rows, "rouge_l", *COMPARISONS[0])
    yield dg.MaterializeResult(
        asset_key=PREDICTIONS,
        metadata=table_metadata(
            predictions, ["task", "model", "prediction", "rouge_l", "reference_log_likelihood"], table=PREDICTIONS
        ),
    )
    yield dg.MaterializeResult(asset_key=SUMMARY, metadata=_summary_metadata(summary))
    yield dg.MaterializeResult(
        asset_key=EVALUATION,
        metadata={
            **_evaluation_metadata(df, summary, by_metric, headline, len(tasks), len(items)),
            "llm_queries": queries.as_json(),
            **peak_memory(language_model.resolved_device()),
        },
    )
    conclusion = headline_conclusion(headline)
    if not conclusion.passed:
        context.log.warning(f"{CHECK_NAME}: {conclusion.description}")
    yield _headline_check(conclusion, headline, _comparison(rows, "log_likelihood", *COMPARISONS[0]))


def _score_models(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    language_model: LanguageModelResource,
    models: dict[str, CountedModel],
    adapters: dict[str, str | None],
    items: Items,
    params: SamplingParams,
) -> tuple[list[dict], list[dict], dict[str, dict[str, list[dict[str, float]]]]]:
    """Scores every model: (evaluation rows, prediction rows, {metric: {label: per-replicate task means}})."""
    task_table, prediction_table = [], []
    by_replicate: dict[str, dict[str, list[dict[str, float]]]] = {m: {} for m in METRICS}
    for key, model in models.items():
        label, rep = key.rsplit("_r", 1)
        with model.for_generation() as view:
            scores = score_model(
                view,
                items,
                params,
                language_model.generation_batch_size(config.generation_batch_size),
                language_model.scoring_batch_size,
                progress_logger(context, f"evaluation/{key}"),
            )
        by_replicate["rouge_l"].setdefault(label, []).append(scores.rouge_l_by_task)
        by_replicate["log_likelihood"].setdefault(label, []).append(scores.log_likelihood_by_task)
        provenance = provenance_columns(model.provenance)
        task_table += task_rows(items, scores, label, int(rep), provenance, adapters[key], context.run_id)
        prediction_table += prediction_rows(items, scores, label, int(rep), provenance, context.run_id)
        context.log.info(
            f"evaluation/{key}: mean ROUGE-L {sum(scores.rouge_l) / len(items):.4f}, "
            f"mean reference log-likelihood {sum(scores.log_likelihood) / len(items):.4f}"
        )
    return task_table, prediction_table, by_replicate


def _summary_metadata(summary: pl.DataFrame) -> dict:
    """The summary table's metadata: the table and its view of every comparison."""
    return {
        **table_metadata(summary, ["metric", "candidate", "reference", "wins", "ties", "losses"], table=SUMMARY),
        "summary": metadata_table(_summary_view(summary), table=SUMMARY),
    }


def _headline_check(conclusion: Conclusion, headline: dict, log_likelihood: dict) -> dg.AssetCheckResult:
    """The result of refine_af_beats_self_instruct (`log_likelihood`: the same pair's log-likelihood row)."""
    return dg.AssetCheckResult(
        asset_key=SUMMARY,
        check_name=CHECK_NAME,
        passed=conclusion.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=conclusion.description,
        metadata={
            **_headline_metadata(headline),
            "log_likelihood_wins_ties_losses": _wtl(log_likelihood),
            **conclusion.metadata(),
            "rule": f"{RULE}: the mean ROUGE-L difference REFINE-AF - Self-Instruct over tasks, bootstrap CI",
        },
    )


def headline_conclusion(headline: dict) -> Conclusion:
    """The check's answer from the summary row of (rouge_l, refine_af, self_instruct): the mean
    paired ROUGE-L difference over tasks and its bootstrap CI; wins / ties / losses only go along."""
    conclusion = ci_conclusion(
        "REFINE-AF beats Self-Instruct by ROUGE-L",
        headline["mean_difference"],
        headline["mean_difference_ci_low"],
        headline["mean_difference_ci_high"],
        headline["n_tasks"],
        unit="ROUGE-L",
        confidence=headline.get("confidence", 0.95),
        n_unit="tasks",
    )
    wtl = f"; wins/ties/losses {_wtl(headline)}"
    return Conclusion(conclusion.passed, conclusion.answer, conclusion.description + wtl)


def _adapters(warehouse: Warehouse) -> dict[str, str | None]:
    """Every replicate's adapter of every tuned model, from each model's table (its latest run):
    "<label>_r<replicate>" -> adapter (None: the base model); the key names a PEFT adapter, which
    may not hold a dot."""
    adapters = {"base_r0": None}
    for label, asset in EVALUATED_MODELS.items():
        if asset:
            adapters.update({f"{label}_r{rep}": path for rep, path in adapter_folders(warehouse, asset).items()})
    return adapters


def _evaluation_metadata(
    df: pl.DataFrame, summary: pl.DataFrame, by_metric: dict, headline: dict, n_tasks: int, n_items: int
) -> dict:
    means = {m: mean_per_model(by_metric[m]) for m in METRICS}
    ll = by_metric["log_likelihood"]
    return {
        **table_metadata(df, ["task", "model", "rouge_l", "log_likelihood"], table=EVALUATION),
        **{f"mean_{metric}_{m}": v for metric in METRICS for m, v in means[metric].items()},
        **_headline_metadata(headline),
        **{
            f"tasks_log_likelihood_differs_from_base_{m}": tasks_differing(ll[m], ll["base"], LOG_LIKELIHOOD_MARGIN)
            for m in EVALUATED_MODELS
            if m != "base"
        },
        "log_likelihood_margin": LOG_LIKELIHOOD_MARGIN,
        "tasks": n_tasks,
        "instances_per_task": n_items // max(n_tasks, 1),
        "summary": metadata_table(_summary_view(summary), table=SUMMARY),
        "per_task": metadata_table(_per_task_view(by_metric), table=f"{EVALUATION}/per_task"),
        "chart": png_markdown(_chart(by_metric, means), "ROUGE-L and reference log-likelihood per task"),
    }


def _comparison(rows: list[dict], metric: str, candidate: str, reference: str) -> dict:
    return next(r for r in rows if (r["metric"], r["candidate"], r["reference"]) == (metric, candidate, reference))


def _wtl(c: dict) -> str:
    return f"{c['wins']}/{c['ties']}/{c['losses']}"


def _headline_metadata(c: dict) -> dict:
    return {
        "share_tasks_refine_af_beats_self_instruct": c["win_share"],
        "share_ci95_low": c["win_share_ci_low"],
        "share_ci95_high": c["win_share_ci_high"],
        "wins_ties_losses": _wtl(c),
        "ties": c["ties"],
        "mean_difference_refine_af_minus_self_instruct": c["mean_difference"],
        "mean_difference_ci95": f"[{c['mean_difference_ci_low']:.4f}, {c['mean_difference_ci_high']:.4f}]",
    }


def _summary_view(summary: pl.DataFrame) -> pl.DataFrame:
    return summary.select(
        "metric",
        "candidate",
        "reference",
        "n_tasks",
        "wins",
        "ties",
        "losses",
        "win_share",
        "win_share_ci_low",
        "win_share_ci_high",
        "mean_difference",
        "mean_difference_ci_low",
        "mean_difference_ci_high",
    )


def _per_task_view(by_metric: dict[str, dict[str, dict[str, float]]]) -> pl.DataFrame:
    tasks = sorted(by_metric["rouge_l"]["base"])
    return pl.DataFrame(
        {
            "task": tasks,
            **{
                f"{metric}_{m}": [by_metric[metric][m][t] for t in tasks]
                for metric in METRICS
                for m in EVALUATED_MODELS
            },
        }
    )


def _chart(by_metric: dict[str, dict[str, dict[str, float]]], means: dict[str, dict[str, float]]) -> bytes:
    tasks = sorted(by_metric["rouge_l"]["base"])
    short = [t.split("_")[1] if t.count("_") >= 1 else t for t in tasks]
    panels = {
        metric: {m: [*(by_metric[metric][m][t] for t in tasks), means[metric][m]] for m in EVALUATED_MODELS}
        for metric in METRICS
    }
    return bar_panels_png(
        [*short, "MEAN"],
        panels,
        "Per held-out task: ROUGE-L and reference log-likelihood (nats/token); "
        "base, Self-Instruct, REFINE-AF, TeaMs-RL",
    )
