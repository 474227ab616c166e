"""``affluent`` commands for researchers, stewards and maintenance."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    """Add the access commands to the ``affluent`` parser."""
    return None
