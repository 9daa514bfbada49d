"""Instruction bootstrapping: seed tasks, parsing, filters, ROUGE-L dedup and instance generation."""
