"""Command-line entry points: ``keyfence`` and ``kfctl``."""
