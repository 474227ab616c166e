"""Reading the lake's Delta tables without Spark (stewards, notebooks, the gateway).

Which reader works for which table:

- tables written with deletion vectors (every ``silver/`` table: a MERGE marks
  changed rows instead of rewriting files) cannot be read through
  ``deltalake.DeltaTable(...).to_pyarrow_table()`` / ``to_pyarrow_dataset()``
  (delta-rs refuses: "reader features {'deletionVectors'} … not yet supported");
  ``DeltaTable(...).scan()`` (delta-rs' DataFusion engine) applies the vectors
  and reads them correctly — :func:`read_table` uses it;
- every other table (ops, quarantine, projects, gold…) reads with either.

DuckDB's own ``delta_scan`` needs DuckDB's ``delta`` extension, which DuckDB
downloads from its extension repository at first use; this project installs
nothing at run time, so DuckDB reads Delta tables through delta-rs' Arrow
stream instead (``duckdb.sql("SELECT … FROM t")`` over ``read_table(uri)``).
"""

from __future__ import annotations

import os

import pyarrow as pa


def delta_uri(path: str) -> str:
    """The URI delta-rs reads: it speaks ``s3://`` where Spark's Hadoop file system speaks ``s3a://``.

    Object-storage credentials and endpoint come from the environment
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
    ``AWS_ALLOW_HTTP`` for a plain-HTTP MinIO), as for every AWS client.
    """
    return "s3://" + path.removeprefix("s3a://") if path.startswith("s3a://") else path


def storage_options() -> dict[str, str] | None:
    """A MinIO on plain HTTP must be allowed explicitly; everything else object_store reads from ``AWS_*`` itself."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    return {"AWS_ALLOW_HTTP": "true"} if endpoint.startswith("http://") else None


def open_delta(path: str):
    """A lake table through delta-rs (local disk or object storage), or ``None`` when it does not exist yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(delta_uri(path), storage_options=storage_options())
    except TableNotFoundError:
        return None


def has_deletion_vectors(path: str) -> bool:
    from deltalake import DeltaTable

    features = DeltaTable(delta_uri(path)).protocol().reader_features or []
    return "deletionVectors" in features


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """The current version of a Delta table as Arrow, deletion vectors applied.

    Example::

        patients = read_table("demo/lake/silver/patient", columns=["person_id", "year_of_birth"])
    """
    from deltalake import DeltaTable

    return pa.RecordBatchReader.from_stream(DeltaTable(delta_uri(path)).scan(columns=columns)).read_all()
