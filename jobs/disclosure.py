"""Output checking of every result leaving the researcher gateway.

Interface used by the gateway: :func:`check_output` on every result and
:func:`neutralise_csv` before a CSV is written. The checks are being
completed; until then a result that cannot be shown safe is refused
(fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from jobs.config import Project
from jobs.policy import AccessDenied

# Characters that make a spreadsheet read a cell as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class OutputRefused(AccessDenied):
    """The result could disclose a person; the message says why and how to rewrite the query."""


@dataclass(frozen=True)
class CheckedOutput:
    """A result that may leave: cells under the threshold nulled, counts rounded."""

    table: pa.Table
    suppressed_cells: int
    notes: list[str] = field(default_factory=list)


def check_output(con, sql: str, result: pa.Table, project: Project, views: dict[str, str]) -> CheckedOutput:
    """The result as it may leave the gateway, or :class:`OutputRefused`."""
    if project.row_level:
        return CheckedOutput(result, 0, ["row-level results allowed for this project"])
    raise OutputRefused("aggregate output checking is not available yet; nothing leaves unchecked")


def neutralise_csv(table: pa.Table) -> pa.Table:
    """String cells a spreadsheet would read as a formula get a leading apostrophe."""
    columns = []
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            risky = pc.starts_with(column, FORMULA_PREFIXES[0])
            for prefix in FORMULA_PREFIXES[1:]:
                risky = pc.or_(risky, pc.starts_with(column, prefix))
            column = pc.if_else(risky, pc.binary_join_element_wise("'", column, ""), column)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=table.schema)
