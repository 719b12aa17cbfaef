"""Recipes and the training loop: dataclasses, parser, run folder, data, loss, trainer."""
