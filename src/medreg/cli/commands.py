"""Imports every subcommand module so that each registers itself on :func:`medreg.cli.main`."""

from medreg.cli import apply, evaluate, info, predict, register, report  # noqa: F401
from medreg.cli import train  # noqa: F401,E402
