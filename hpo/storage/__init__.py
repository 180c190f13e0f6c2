"""Storages: URL -> an Optuna storage with retries, heartbeats and locks; the artifact store;
the retry of trials whose worker died."""
