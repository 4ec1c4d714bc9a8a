"""Command-line entry points: ``keyfence`` (and, later, ``kfctl``)."""
