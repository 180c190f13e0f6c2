"""A user's own package: a small CNN and an image Dataset over the Fashion-MNIST files, tuned by hpo."""
