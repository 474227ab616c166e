"""Today's date for everything that judges validity by the calendar.

Project validity, consent in force and erasure "as of" dates all ask this
module, never ``date.today()`` directly, so that a backfill or a test can fix
the date with ``AFFLUENT_TODAY=YYYY-MM-DD`` and get the same answer on any day.
"""

from __future__ import annotations

import datetime as dt
import os

ENV_TODAY = "AFFLUENT_TODAY"


def today() -> dt.date:
    """``AFFLUENT_TODAY`` when set (ISO date), else the machine's date (UTC).

    Example::

        AFFLUENT_TODAY=2026-06-15 affluent publish   # as the policy stood that day
    """
    fixed = os.environ.get(ENV_TODAY, "").strip()
    if not fixed:
        return dt.datetime.now(dt.timezone.utc).date()
    try:
        return dt.date.fromisoformat(fixed)
    except ValueError:
        raise ValueError(f"{ENV_TODAY}={fixed!r} is not an ISO date (YYYY-MM-DD)") from None
