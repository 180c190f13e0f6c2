"""Names hpo gives what it keeps in Optuna's storage and artifact store: one place, read without
optuna by the read-only commands (hpo.search.reading) and written by the rest."""

RESUMES_ATTR = "hpo:resumes"  # trial system attr of a retry that resumes a trial stopped under it (not a failure)
CHECKPOINT_ATTR = "hpo:checkpoint_epoch"  # trial system attr of a requeued trial: the epoch it resumes from
RERUN_ATTR = "hpo:rerun_of"  # trial system attr: this trial runs a completed trial again, to save its model anew
MODEL_FILE = "model.pt"  # a trial's final state, kept when it may be the best (the test step's input)
LOG_FILENAME = "log.txt"  # a trial's output, as an artifact of the trial
