"""Language-model backend: loading, generation, likelihood scoring, adapters, retry and prompts."""
