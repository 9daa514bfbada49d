"""Stage 5: held-out zero-shot evaluation of the base and the fine-tuned model."""


import dagster as dg
import polars as pl

from refine_af_pipeline.evaluation import best_rouge_l, first_line, load_tasks
from refine_af_pipeline.generation import SamplingParams, generate
from refine_af_pipeline.plots import bar_chart_png
from refine_af_pipeline.prompts import evaluation_prompt
from resources import LanguageModelResource, Warehouse

from .metadata import markdown_table, png_markdown, progress_logger, table_metadata
from .shared import latest_artifact


class EvaluationConfig(dg.Config):
    task_dir: str | None = None  # a folder of SuperNI-format task files; the built-in set if unset
    instances_per_task: int = 2  # 0 = all
    max_new_tokens: int = 24


@dg.asset(group_name="evaluation", kinds={"duckdb", "pytorch"}, deps=["finetuned_model"], pool="gpu")
def evaluation(context: dg.AssetExecutionContext, config: EvaluationConfig, warehouse: Warehouse,
               language_model: LanguageModelResource) -> dg.MaterializeResult:
    """ROUGE-L (best over references) of the base model and the fine-tuned model on held-out tasks in
    the Super-NaturalInstructions format, zero-shot with greedy decoding; one row per (task, model),
    and the share of tasks the fine-tuned model improves."""
    tasks = load_tasks(config.task_dir)
    items = [(t, inst) for t in tasks
             for inst in (t.instances[: config.instances_per_task] if config.instances_per_task > 0 else t.instances)]
    adapter = latest_artifact(warehouse, "finetuned_model")
    params = SamplingParams(max_new_tokens=config.max_new_tokens, do_sample=False)
    rows = []
    for label, adapter_path in (("base", None), ("finetuned", adapter)):
        model, tokenizer, source, _ = language_model.load(adapter=adapter_path)
        # Plain text prompts: the SuperNI layout itself ends with "Output:".
        prompts = [evaluation_prompt(t.definition, inst.input) for t, inst in items]
        gens = generate(model, tokenizer, prompts, params, language_model.batch_size, 0,
                        progress_logger(context, f"evaluation/{label}"))
        scores: dict[str, list[float]] = {}
        for (task, inst), gen in zip(items, gens):
            scores.setdefault(task.name, []).append(best_rouge_l(first_line(gen.text), inst.references))
        for task_name, values in scores.items():
            rows.append(dict(task=task_name, model=label, model_id=source.model_id, adapter_path=adapter_path,
                             rouge_l=sum(values) / len(values), n_instances=len(values), run_id=context.run_id))
    df = pl.DataFrame(rows, schema_overrides={"adapter_path": pl.Utf8})
    warehouse.write_table("evaluation", df)
    wide = df.pivot(on="model", index="task", values="rouge_l").sort("task")
    improved = float((wide["finetuned"] > wide["base"]).mean())
    return dg.MaterializeResult(metadata={
        **table_metadata(df, ["task", "model", "rouge_l"]),
        "mean_rouge_l_base": float(wide["base"].mean()),
        "mean_rouge_l_finetuned": float(wide["finetuned"].mean()),
        "share_tasks_improved": improved,
        "per_task": dg.MetadataValue.md(markdown_table(wide)),
        "chart": png_markdown(bar_chart_png(wide["task"].to_list(), {"base": wide["base"].to_list(),
                                                                     "finetuned": wide["finetuned"].to_list()},
                                            "ROUGE-L per held-out task"), "ROUGE-L per task"),
    })
