"""Column descriptions, shown in the UI's Columns table of each asset.

Each table's own columns are described beside the asset that writes it: its module's `COLUMNS`
(table name -> column -> description), registered with `declare`; the batch ledger's tables in
resources/batch_ledger.py. `SHARED` below holds the columns that mean the same in every table that
has them (provenance, instance keys, the feedback components). A column is looked up in its
table's own declaration first, then in `SHARED`. A metadata table that is not a stored table
(a per-branch summary in the metadata) is declared under `<asset>/<metadata key>`.
"""

from resources.batch_ledger import COLUMNS as LEDGER_COLUMNS

COMPONENTS = {
    "preference": "rating by the preference judge (offline default: the base LLM's 1-10 rating mapped to 0-1; "
    "reward model: raw logit)",
    "naturalness": "naturalness score (offline default: exp of the mean token log-likelihood of the output, 0-1; "
    "UniEval: P(Yes))",
    "coherence": "coherence score (offline default: cosine similarity of request and output embeddings, -1 to 1; "
    "UniEval: P(Yes))",
    "understandability": "understandability score (offline default: Flesch reading ease clipped to 0-100, scaled "
    "to 0-1; UniEval: P(Yes))",
    "learned_reward": "the learned reward: a Bradley-Terry score on MiniLM embeddings fitted to prefer human seed "
    "instances (reward_model; unbounded, higher = better)",
}

SHARED: dict[str, str] = {
    # provenance
    "run_id": "Dagster run that wrote the row",
    "pool": "the instruction pool the row was made from (instruction_pool; a stage never combines two pools)",
    "model_id": "model that generated or answered, by the name it was served as (in process: Hugging Face id or "
    "directory, the embedded model marked as such; vllm: plus the adapter; openai: the served model name)",
    "backend": "generation engine that produced the row: transformers, vllm or openai",
    "engine_version": "version of that engine (transformers x.y, vllm x.y, or what the server reports)",
    "base_model_id": "base model the adapter was trained on",
    "adapter_path": "directory of the LoRA adapter this row belongs to (null: the base model)",
    "policy_adapter": "LoRA adapter of the RL policy that wrote the instance (null: the base model, the "
    "Self-Instruct baseline)",
    "sampling_params": "sampling settings of the generation as JSON (temperature, top_p, max_new_tokens, seed ...)",
    "settings": "the stage's config for this run as JSON",
    "llm_queries": "model queries of the run that wrote the row, by role, as JSON (the same on each of its rows; "
    "the query ledger reads them)",
    "scorers": "name and version of the scorer behind each feedback component, as JSON",
    "replicate": "replicate of the branch's instance draw and SFT (0-based; each its own sampling and trainer seeds)",
    "branch": "the arm of the comparison: self_instruct, refine_af, best_of_n or teams_rl",
    # instance keys and what the model wrote
    "instruction_id": "id of the instruction (generated: <plan id prefix>-<prompt index>-<position in the "
    "response>; TeaMs-RL: teams-<seed id>-<step>)",
    "instance_id": "id of one generated instance: <instruction id>-<sample index>, -r<replicate> from the second "
    "replicate on (TeaMs-RL: its instruction's id, one answer each)",
    "instruction": "the task instruction text",
    "input": "the instance's input (empty for tasks without one)",
    "output": "the instance's output",
    "generation": "the model's raw text for the instance, before parsing",
    "generation_tokens": "tokens the model generated for the row's text",
    "hit_token_limit": "whether the generation stopped at max_new_tokens",
    "gate_reason": "why the instance gate rejected the instance (missing_output, empty_output, "
    "output_cut_at_token_limit, degenerate_repetition, output_copies_input, output_copies_instruction, "
    "output_not_a_named_label; refine_af_pipeline/feedback/gates.py); null when it passed",
    # the feedback components and who scored them
    **COMPONENTS,
    **{f"{c}_scorer": f"scorer name and version behind {c}" for c in COMPONENTS},
}

_DECLARED: dict[str, dict[str, str]] = {}


def declare(columns: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Registers each table's own column descriptions (table -> column -> description) and returns
    them; the module that writes the tables calls it beside their assets."""
    for table, described in columns.items():
        if _DECLARED.get(table, described) != described:
            raise ValueError(f"the columns of {table} are declared twice, differently")
        _DECLARED[table] = described
    return columns


def declared() -> dict[str, dict[str, str]]:
    """Every table's own declarations (those of the modules imported so far)."""
    return dict(_DECLARED)


def column_description(table: str, column: str) -> str:
    """The column's one-line description in `table`: the table's own, else the shared one; empty
    for a column neither knows."""
    return _DECLARED.get(table, {}).get(column) or SHARED.get(column, "")


declare(LEDGER_COLUMNS)
