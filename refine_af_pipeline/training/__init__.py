"""Fine-tuning: supervised (SFT) and RL training, their shared trainer setup, RL diagnostics and splits."""
