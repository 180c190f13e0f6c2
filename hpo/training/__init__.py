"""Training: model factories, optimizers and schedules, the Trainer, fused groups of MLPs, and
hpo's own loop written as a train(trial) function over the public trial API."""
