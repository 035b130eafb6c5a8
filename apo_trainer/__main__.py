"""``python -m apo_trainer`` (and ``accelerate launch -m apo_trainer``) runs the apo-train CLI."""

from apo_trainer.cli import main

main()
