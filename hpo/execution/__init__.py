"""Running trials: the one-at-a-time and fused worker loops, running them here or in local
worker processes, and what a run prints."""
