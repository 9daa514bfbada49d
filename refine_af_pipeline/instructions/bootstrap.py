"""Self-Instruct bootstrapping: sample prompt examples, generate, parse into provenance rows."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field, field_validator, model_validator

from ..llm.backend import Generation, SamplingParams, ServedModel, render_prompt
from ..llm.prompts import bootstrap_continuation_prefix, bootstrap_prompt, is_classification_prompt
from ..settings_types import NonNegativeInt, PositiveInt, SamplingSettings
from .filters import rejection_reason
from .parsing import parse_numbered_continuation
from .pools import check_pool_name
from .rouge import RougeDeduplicator

N_PROMPT_EXAMPLES = 8
N_MACHINE_EXAMPLES = 2


@dataclass(frozen=True)
class PoolItem:
    id: str
    instruction: str
    is_classification: bool


@dataclass(frozen=True)
class BootstrapPrompt:
    text: str
    example_ids: list[str]
    classification: bool


def sample_prompt(
    seeds: Sequence[PoolItem], machine: Sequence[PoolItem], rng: random.Random, classification: bool = False
) -> BootstrapPrompt:
    """8 examples: up to 2 machine-generated, the rest human seeds, shuffled together.

    The classification variant draws only from classification items, so the model continues a list
    of classification tasks.
    """
    if classification:
        seeds = [s for s in seeds if s.is_classification] or list(seeds)
        machine = [m for m in machine if m.is_classification]
    n_machine = min(N_MACHINE_EXAMPLES, len(machine))
    n_seed = min(N_PROMPT_EXAMPLES - n_machine, len(seeds))
    examples = rng.sample(list(machine), n_machine) + rng.sample(list(seeds), n_seed)
    rng.shuffle(examples)
    return BootstrapPrompt(
        bootstrap_prompt([e.instruction for e in examples], classification), [e.id for e in examples], classification
    )


def generate_instruction_rows(
    model: ServedModel,
    prompts: Sequence[BootstrapPrompt],
    params: SamplingParams,
    run_id: str,
    batch_size: int,
    seed: int,
    progress=None,
    id_offset: int = 0,
) -> list[dict]:
    """One row per parsed instruction, or one row with an empty instruction for a response that
    did not parse, so nothing the model wrote is dropped silently."""
    rendered = [
        render_prompt(model.tokenizer, p.text, bootstrap_continuation_prefix(len(p.example_ids))) for p in prompts
    ]
    generations: list[Generation] = model.generate(rendered, params, batch_size, seed, progress)
    rows = []
    for k, (prompt, gen) in enumerate(zip(prompts, generations)):
        parsed = parse_numbered_continuation(gen.text, len(prompt.example_ids) + 1, gen.hit_token_limit)
        base = dict(
            run_id=run_id,
            prompt_index=id_offset + k,
            prompt_example_ids=json.dumps(prompt.example_ids),
            prompt_type="classification" if prompt.classification else "general",
            model_id=model.provenance.served_model,
            backend=model.provenance.backend,
            engine_version=model.provenance.engine_version,
            sampling_params=json.dumps(params.as_dict()),
            raw_response=gen.text,
            response_tokens=gen.n_tokens,
            hit_token_limit=gen.hit_token_limit,
            dropped_truncated_item=parsed.dropped_truncated,
        )
        items = parsed.instructions or [""]
        for j, instruction in enumerate(items):
            rows.append(
                dict(
                    instruction_id=f"{run_id[:8]}-{id_offset + k:05d}-{j:02d}",
                    instruction=instruction,
                    parse_status=parsed.status,
                    position_in_response=j,
                    **base,
                )
            )
    return rows


def deduplication_rows(raw_rows: Sequence[dict], dedup: RougeDeduplicator, run_id: str) -> list[dict]:
    """The decision on each raw row, in order: unparseable, rejected by a filter (length, keyword,
    punctuation, non-ASCII ...), rejected as too similar by ROUGE-L to a seed or an instruction kept
    earlier (`dedup` holds those and learns each kept one), or kept. Classification labels are
    added by the caller (they need the model)."""
    rows = []
    for r in raw_rows:
        reason = "unparseable_response" if r["parse_status"] != "ok" else rejection_reason(r["instruction"])
        rows.append(
            dict(
                instruction_id=r["instruction_id"],
                instruction=r["instruction"],
                source_run_id=r["run_id"],
                run_id=run_id,
                max_rouge_l=None,
                most_similar_instruction=None,
                reason=reason,
            )
        )
    # Candidates that pass the filters are de-duplicated in order, in one batched pass.
    passing = [k for k, row in enumerate(rows) if row["reason"] is None]
    for k, decision in zip(passing, dedup.consider_many([rows[k]["instruction"] for k in passing])):
        rows[k].update(
            max_rouge_l=decision.max_rouge_l,
            most_similar_instruction=decision.most_similar,
            reason=None if decision.keep else "rouge_l_above_threshold",
        )
    for row in rows:
        row["decision"] = "kept" if row["reason"] is None else "rejected"
        row.update(is_classification=None, is_classification_p=None, classification_model_id=None)
    return rows


def classify_instructions(
    model: ServedModel, instructions: Sequence[str], batch_size: int = 8
) -> list[tuple[bool, float]]:
    """Few-shot "Is it classification?": (label, P(Yes) renormalised over Yes/No)."""
    if not instructions:
        return []
    contexts = [render_prompt(model.tokenizer, is_classification_prompt(i)) for i in instructions]
    probs = model.next_token_distribution(contexts, ["Yes", "No"], batch_size)
    return [(p[0] > 0.5, p[0]) for p in probs]


class BootstrapSettings(SamplingSettings):
    """Settings of Self-Instruct bootstrapping (`bootstrap_instructions`). The defaults are the
    method's: grow the pool to REFINE-AF's 15,000 instructions per model; configs/demo.yaml and
    configs/experiment.yaml make a run small."""

    num_prompts: PositiveInt = Field(
        16_000,
        description=(
            "bootstrap prompts per run at most; the run stops earlier at target_pool_size (the embedded model's "
            "responses gave 0.7-1.4 kept instructions per prompt, so a pool may need a second run)"
        ),
    )
    classification_prompts: NonNegativeInt = Field(
        2_000,
        description=(
            "of num_prompts, how many use the classification-only variant (an eighth: classification tasks are rarer "
            "in the model's continuations than in the seed pool)"
        ),
    )
    max_new_tokens: PositiveInt = Field(112, description="tokens per response at most (a list of instructions)")
    target_pool_size: PositiveInt = Field(
        15_000, description=("stop generating once this many instructions are kept (REFINE-AF's pool per model)")
    )
    resume_unfinished: bool = Field(
        True,
        description=(
            "a plan a crashed run left unfinished is completed (its missing batches, with its own prompts and "
            "settings) instead of starting a new one; false abandons it"
        ),
    )
    pool: str = Field(
        "",
        description=(
            "the instruction pool this run grows and de-duplicates against, and every later stage reads; empty = "
            "named by the seed set and the generator model (<seed file>-<seed digest>--<model>), so a new seed "
            "file or model starts its own pool; name an existing pool to add to it on purpose ('unnamed': rows "
            "from before pools were named)"
        ),
    )

    @field_validator("pool")
    @classmethod
    def _pool_name(cls, value: str) -> str:
        return check_pool_name(value) if value else value

    @model_validator(mode="after")
    def _classification_share(self):
        if self.classification_prompts > self.num_prompts:
            raise ValueError(
                f"classification_prompts ({self.classification_prompts}) cannot exceed num_prompts ({self.num_prompts})"
            )
        return self
