"""When batches are extracted, and which period each batch's new facts fall in.

Everything derives from the batch index, never from the wall clock, so a seed
always gives the same bytes. Clean event dates stay at least a day before the
extraction (whatever time zone a reader assumes); injected future dates sit at
least 30 days after it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

FIRST_EXTRACT = dt.datetime(2026, 1, 5, 2, 0, tzinfo=dt.timezone.utc)
BATCH_INTERVAL = dt.timedelta(days=7)
HISTORY_START = np.datetime64("2019-01-01T00:00", "m")
FUTURE_MARGIN_DAYS = 30


@dataclass(frozen=True)
class Calendar:
    batches: int

    def batch_id(self, batch: int) -> str:
        day = FIRST_EXTRACT + batch * BATCH_INTERVAL
        return f"{day:%Y%m%d}-{batch + 1:03d}"

    def extracted_at(self, batch: int, establishment_index: int) -> dt.datetime:
        """Extraction instant (UTC): establishments extract an hour apart on the same night."""
        return FIRST_EXTRACT + batch * BATCH_INTERVAL + dt.timedelta(hours=establishment_index)

    def window(self, batch: int) -> tuple[np.datetime64, np.datetime64]:
        """Local times ``[start, end)`` in which facts first delivered by ``batch`` happened."""
        end = np.datetime64((FIRST_EXTRACT + batch * BATCH_INTERVAL).date(), "D") - np.timedelta64(1, "D")
        start = HISTORY_START if batch == 0 else self.window(batch - 1)[1]
        return start, end.astype("datetime64[m]")

    def window_ends(self) -> np.ndarray:
        return np.array([self.window(b)[1] for b in range(self.batches)], dtype="datetime64[m]")

    def window_starts(self) -> np.ndarray:
        return np.array([self.window(b)[0] for b in range(self.batches)], dtype="datetime64[m]")
