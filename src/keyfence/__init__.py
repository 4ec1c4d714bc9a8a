"""keyfence: a userspace key retention service whose key removal never loses data."""

__version__ = "0.1.0"
