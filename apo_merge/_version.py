"""The release's version: a leaf module (pyproject reads it; the card and the CLIs import it)."""

__version__ = "0.1.0"
