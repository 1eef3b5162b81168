"""Command-line layer: parses arguments and prints; the work lives in the core modules."""

from recare_cli.__main__ import main
from recare_cli.cli.app import app

__all__ = ["app", "main"]
