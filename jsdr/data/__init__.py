"""Data: prompts, rewards, datasets and the embedded toy task."""
