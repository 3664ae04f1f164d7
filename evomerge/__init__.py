"""evomerge: evolutionary merge-search for language models."""

__version__ = "0.1.0"
