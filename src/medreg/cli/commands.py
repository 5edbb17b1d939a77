"""Imports every subcommand module so that each registers itself on :func:`medreg.cli.main`."""

from medreg.cli import apply, evaluate, info, register, report  # noqa: F401
