"""Exceptions raised by medreg; the CLI turns them into a one-line message and exit status 2."""

from __future__ import annotations


class MedregError(Exception):
    """Base class of medreg's own errors: the message says what is wrong and what to do."""


class InputError(MedregError, ValueError):
    """Bad user input: a file, a shape, a value or an option that cannot be used."""


class GeometryError(InputError):
    """Inconsistent or unusable geometry (direction not invertible, dimension mismatch, ...)."""
