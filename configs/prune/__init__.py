"""Pruning experiments (``prune`` stage); each module's docstring has its launch command."""
