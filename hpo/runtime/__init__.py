"""The trial runtime: hpo.Trial (what every training function gets), how a trial can end, the
one checkpoint format, and the listener hooks between a trial and a front end."""
