"""A study file -> a checked, frozen StudySpec: the schema, its rules, the parameter catalogue, the
search space, the sampler and pruner by name, references to user code, and the studies that ship
with hpo. Imports no torch, and optuna only where a sampler or pruner is checked or built
(strategy.py, when it is called).

Public names are re-exported lazily by `hpo` itself (hpo.load_spec, hpo.StudySpec), so importing
one module here never loads the rest."""
