"""The `iomni` command line."""

from iomni.cli.main import main

__all__ = ["main"]
