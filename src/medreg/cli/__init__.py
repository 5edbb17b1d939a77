"""The ``medreg`` command line. Each subcommand lives in its own module and registers itself.

Errors in user input (:class:`~medreg.core.errors.MedregError`, missing files) end the command
with exit status 2 and one line on stderr: ``medreg <command>: error: <cause>``.
"""

from __future__ import annotations

import sys
import warnings

import click

from medreg.cli._memory import reuse_freed_memory
from medreg.core.errors import MedregError


class MedregGroup(click.Group):
    """Click group that turns medreg's errors into one line and a non-zero exit status."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MedregError as exc:
            name = ctx.invoked_subcommand or "medreg"
            click.echo(f"medreg {name}: error: {exc}", err=True)
            sys.exit(2)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            name = ctx.invoked_subcommand or "medreg"
            click.echo(f"medreg {name}: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=MedregGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medreg")
def main() -> None:
    """medreg: medical image registration (world frame LPS mm, as ITK/ANTs/elastix)."""
    reuse_freed_memory()  # before any large allocation (see medreg.cli._memory)
    warnings.showwarning = _warning_line


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a NIfTI whose sform and qform differ, ...) as one line, without source lines."""
    click.echo(f"medreg: warning: {message}", err=True)


# subcommands register themselves on import
from medreg.cli import commands as _commands  # noqa: E402,F401
