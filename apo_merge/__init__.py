"""apo-merge: exact, streaming APO extrapolation ``cur + alpha * (cur - prev)`` of Hugging Face checkpoints."""

__version__ = "0.1.0"
