"""``python -m boundflow`` runs the command-line interface."""
from boundflow.cli import run

run()
