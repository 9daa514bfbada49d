"""teams_instruction_pairs: the expert model's answers to the kept evolved instructions (an
instruction's input, if any, is inside it), gated and filtered as the other branches' instances
are; `keep` marks the pairs SFT uses."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from ..feedback.gates import InstanceGate
from ..instructions.instances import filter_reason
from ..llm.backend import Generation


def expert_answer_frame(
    kept: pl.DataFrame, answers: Sequence[Generation], gate: InstanceGate, **run_columns
) -> pl.DataFrame:
    """One row per answer to `kept` (teams_evolved_instructions' kept rows, in the order answered):
    the pair, its gate and filter decision, `run_columns`, then the chain step it came from."""
    rows = [
        dict(
            instance_id=iid,
            instruction_id=iid,
            instruction=text,
            input="",
            output=g.text.strip(),
            generation_tokens=g.n_tokens,
            hit_token_limit=g.hit_token_limit,
            parse_status="ok",
            gate_reason=gate.reason("ok", text, "", g.text.strip(), cut=g.hit_token_limit),
        )
        for iid, text, g in zip(kept["instruction_id"].to_list(), kept["instruction"].to_list(), answers, strict=True)
    ]
    reasons = filter_reason(rows)
    return (
        pl.DataFrame(rows, schema_overrides={"gate_reason": pl.Utf8})
        .with_columns(
            pl.Series("filter_reason", reasons, dtype=pl.Utf8),
            pl.Series("keep", [r is None for r in reasons]),
            *(pl.lit(v).alias(k) for k, v in run_columns.items()),
        )
        .join(kept.select("instruction_id", "seed_id", "operation", "step"), on="instruction_id", how="left")
    )
