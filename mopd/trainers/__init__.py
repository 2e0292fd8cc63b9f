"""Trainers: SFT and GRPO through TRL, and the MOPD distillation loop (mopd.trainers.distill)."""
