"""A study file -> a checked, frozen StudySpec: the schema, its rules, the parameter catalogue, the
search space, and references to user code. Imports neither torch nor optuna.

Public names are re-exported lazily by `hpo` itself (hpo.load_spec, hpo.StudySpec), so importing
one module here never loads the rest."""
