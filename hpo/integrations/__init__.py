"""Adapters between hpo's trial API and other training frameworks (optional extras)."""
