"""Datasets: the bundled and file sources, the user's data function, and the splits, folds,
scaling and device placement of hpo's own loop."""
