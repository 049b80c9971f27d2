"""Nets of your own for dd-dist: `model.arch=examples.nets:small_cnn` (see README, "Bring your own model")."""
