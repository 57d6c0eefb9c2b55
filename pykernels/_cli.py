"""What the ``python -m pykernels`` commands share: how a user's mistake is reported."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A mistake in the command line or its files: ``main`` prints it as one line on
    stderr and exits with status 2, as argparse does for its own checks."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def one_line(e: BaseException) -> str:
    """An exception's message on one line (torch and transformers write paragraphs)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."
