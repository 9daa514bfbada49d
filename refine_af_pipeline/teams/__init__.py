"""TeaMs-RL: an RL-trained instructor chooses which rewrite operation to apply next to an
instruction; a reviewer model's judgement of each rewrite is the reward (Gu, Knoll, Jin 2024)."""
