"""The study: creating or joining it, samplers and pruners by name, the shared budget, the
summary of results, and the best trial scored once on test data."""
