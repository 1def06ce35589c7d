"""lrc_dist: Low-Rank Clone distillation of decoder-only language models."""
