"""The asset groups: one per branch of the comparison, so the UI's lineage reads as the branches.

The shared pool (seed tasks, the bootstrapped instructions, the learned reward and the base model's
scores) feeds every branch; each branch group holds what only that branch makes, up to its
fine-tuned model; the evaluation group holds the equal SFT draws, the audit, the evaluation, the
verdict and the query ledger; the exports group writes the datasets.
"""

SHARED_POOL = "shared_pool"
REFINE_AF = "refine_af"
SELF_INSTRUCT = "self_instruct"
BEST_OF_N = "best_of_n"
TEAMS_RL = "teams_rl"
EVALUATION = "evaluation"
EXPORTS = "exports"

GROUPS = (SHARED_POOL, REFINE_AF, SELF_INSTRUCT, BEST_OF_N, TEAMS_RL, EVALUATION, EXPORTS)
