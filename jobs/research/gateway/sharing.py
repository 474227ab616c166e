"""The Delta Sharing protocol, served by the gateway (open REST protocol, delta-io/delta-sharing PROTOCOL.md).

Each project is a share named after it, visible to its members' tokens; it
holds one schema, ``extracts``, with one table per published dataset.
Shares give out row-level data, so a project's tables are shared only when
the project declares ``row_level: true``; otherwise its share lists no table
and a table request is refused (403): aggregate results go through the SQL
endpoint, which checks every output.

Table queries answer in the ``parquet`` response format: a ``protocol`` line,
a ``metaData`` line, then one ``file`` line per data file, whose URL the
gateway signs (HMAC-SHA256 over share, table, path and expiry with a random
secret made at start, so URLs die with the process) and serves itself with
HTTP range support: from disk for a local lake, from the object store for an
``s3a://`` lake, read with the gateway's own read-only credentials. The
gateway passes objects on rather than handing out S3 pre-signed URLs: a
pre-signed URL stays valid after its token is revoked or its user leaves the
project, is not audited per download, and would need the object store to be
reachable by researchers, who reach only the gateway. Time travel (``version``,
``timestamp``, change data feed) is refused: old versions may still hold
withdrawn persons. A table whose files carry deletion vectors is refused
(this server does not apply them; its files alone would return deleted rows).
Every call is audited with the token's user, each file download included: a
file URL names the token it was handed to, and stops working when that token
is revoked or its user leaves the project.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import time
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from pyarrow.fs import FileType

from jobs.research import access

from jobs.core import clock
from jobs.core.arrow_tables import delta_uri
from jobs.privacy.policy import AccessDenied, check_access

PREFIX = "/delta-sharing"
SCHEMA = "extracts"
URL_TTL_SECONDS = 900
ENGINE = "delta-sharing"
ACTION_SHARING = "sharing"
NDJSON = "application/x-ndjson; charset=utf-8"


def _sign(key: bytes, share: str, table: str, path: str, expires: int, token_id: str) -> str:
    message = f"{share}\n{table}\n{path}\n{expires}\n{token_id}".encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def add_routes(app: FastAPI, gateway) -> None:
    from jobs.research.gateway.app import UNKNOWN_USER, GatewayError

    def _project(request: Request, share: str, what: str):
        record, project, event = gateway.authorise(request, share, ACTION_SHARING, sql=None, engine=ENGINE)
        return record, project, event | {"reason": what}

    def _allowed(event: dict, what: str, rows: int | None = None) -> None:
        gateway.write(event | {"outcome": access.OUTCOME_ALLOWED, "reason": what, "rows_returned": rows})

    def _refuse(event: dict, status: int, code: str, message: str):
        gateway.write(event | {"outcome": access.OUTCOME_REFUSED, "reason": message})
        raise GatewayError(status, code, message)

    def _tables(project) -> list[str]:
        from deltalake import DeltaTable

        if not project.row_level:
            return []
        return [d for d in sorted(project.datasets)
                if DeltaTable.is_deltatable(delta_uri(gateway.lake.project(project.id, d)))]

    def _check_schema(event, share, schema):
        if schema != SCHEMA:
            _refuse(event, 404, "SCHEMA_NOT_FOUND", f"share {share} has no schema {schema!r} (only {SCHEMA!r})")

    def _table(event, project, share, schema, table):
        from deltalake import DeltaTable

        _check_schema(event, share, schema)
        if not project.row_level:
            _refuse(event, 403, "PERMISSION_DENIED", f"project {project.id} does not allow row-level access; "
                    "query it through the SQL endpoint, whose results are output-checked")
        if table not in _tables(project):
            _refuse(event, 404, "TABLE_NOT_FOUND", f"share {share} has no table {schema}.{table}")
        delta = DeltaTable(delta_uri(gateway.lake.project(project.id, table)))
        try:
            access.refuse_deletion_vectors(delta, f"table {share}.{schema}.{table}")
        except access.QueryRefused as exc:
            _refuse(event, 400, "UNSUPPORTED_TABLE", str(exc))
        return delta

    def _share_item(share: str) -> dict:
        return {"name": share, "id": share}

    def _table_item(share: str, table: str) -> dict:
        return {"name": table, "schema": SCHEMA, "share": share, "shareId": share, "id": f"{share}.{SCHEMA}.{table}"}

    def _protocol_and_metadata(delta) -> list[dict]:
        meta = delta.metadata()
        add = access.add_actions(delta)
        return [{"protocol": {"minReaderVersion": 1}},
                {"metaData": {"id": meta.id, "format": {"provider": "parquet"},
                              "schemaString": delta.schema().to_json(),
                              "partitionColumns": list(meta.partition_columns),
                              "configuration": {}, "version": delta.version(), "numFiles": add.num_rows,
                              "size": int(sum(add.column("size_bytes").to_pylist() or [0]))}}]

    def _ndjson(lines: list[dict], version: int) -> Response:
        body = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
        return Response(body, media_type=NDJSON, headers={"delta-table-version": str(version)})

    @app.get(f"{PREFIX}/shares")
    def list_shares(request: Request):
        record, consortium = gateway.token_record(request, ACTION_SHARING, "-")
        shares = [record.project_id] if record.project_id in consortium.projects else []
        items = []
        for share in shares:
            _, _, event = gateway.authorise(request, share, ACTION_SHARING, engine=ENGINE)
            _allowed(event, "list shares")
            items.append(_share_item(share))
        return {"items": items}

    @app.get(f"{PREFIX}/shares/{{share}}")
    def get_share(share: str, request: Request):
        _, _, event = _project(request, share, "get share")
        _allowed(event, "get share")
        return {"share": _share_item(share)}

    @app.get(f"{PREFIX}/shares/{{share}}/schemas")
    def list_schemas(share: str, request: Request):
        _, _, event = _project(request, share, "list schemas")
        _allowed(event, "list schemas")
        return {"items": [{"name": SCHEMA, "share": share}]}

    @app.get(f"{PREFIX}/shares/{{share}}/schemas/{{schema}}/tables")
    def list_tables(share: str, schema: str, request: Request):
        _, project, event = _project(request, share, "list tables")
        _check_schema(event, share, schema)
        tables = _tables(project)
        _allowed(event, "list tables", len(tables))
        return {"items": [_table_item(share, t) for t in tables]}

    @app.get(f"{PREFIX}/shares/{{share}}/all-tables")
    def list_all_tables(share: str, request: Request):
        _, project, event = _project(request, share, "list all tables")
        tables = _tables(project)
        _allowed(event, "list all tables", len(tables))
        return {"items": [_table_item(share, t) for t in tables]}

    @app.api_route(f"{PREFIX}/shares/{{share}}/schemas/{{schema}}/tables/{{table}}/version", methods=["GET", "HEAD"])
    def table_version(share: str, schema: str, table: str, request: Request):
        _, project, event = _project(request, share, f"version of {table}")
        if request.query_params.get("startingTimestamp"):
            _refuse(event, 400, "INVALID_PARAMETER_VALUE", "time travel is not available; the current version only")
        delta = _table(event, project, share, schema, table)
        _allowed(event, f"version of {schema}.{table}")
        return Response(status_code=200, headers={"delta-table-version": str(delta.version())})

    @app.get(f"{PREFIX}/shares/{{share}}/schemas/{{schema}}/tables/{{table}}/metadata")
    def table_metadata(share: str, schema: str, table: str, request: Request):
        _, project, event = _project(request, share, f"metadata of {table}")
        delta = _table(event, project, share, schema, table)
        _allowed(event, f"metadata of {schema}.{table}")
        return _ndjson(_protocol_and_metadata(delta), delta.version())

    @app.post(f"{PREFIX}/shares/{{share}}/schemas/{{schema}}/tables/{{table}}/query")
    async def table_query(share: str, schema: str, table: str, request: Request):
        body = await request.body()
        record, project, event = _project(request, share, f"query of {table}")
        try:
            options = json.loads(body or b"{}")
        except ValueError:
            _refuse(event, 400, "INVALID_PARAMETER_VALUE", "the request body is not JSON")
        delta = _table(event, project, share, schema, table)
        if any(options.get(k) is not None for k in ("timestamp", "startingVersion", "endingVersion")) or \
                options.get("version") not in (None, delta.version()):
            _refuse(event, 400, "INVALID_PARAMETER_VALUE", "time travel is not available; the current version only")
        expires = int(time.time()) + URL_TTL_SECONDS
        base = str(request.base_url).rstrip("/")
        lines = _protocol_and_metadata(delta)
        add = access.add_actions(delta).to_pylist()
        rows = 0
        for action in add:
            path = action["path"]
            signature = _sign(gateway.signing_key, share, table, path, expires, record.token_id)
            url = (f"{base}{PREFIX}/files/{quote(share)}/{quote(table)}/{quote(path)}?expires={expires}"
                   f"&token={record.token_id}&sig={signature}")
            partitions = {k.removeprefix("partition.").removeprefix("partition_values."): (None if v is None else str(v))
                          for k, v in action.items() if k.startswith(("partition.", "partition_values."))}
            rows += int(action.get("num_records") or 0)
            lines.append({"file": {"url": url, "id": hashlib.sha256(path.encode()).hexdigest()[:32],
                                   "partitionValues": partitions, "size": int(action["size_bytes"]),
                                   "expirationTimestamp": expires * 1000}})
        _allowed(event, f"query of {schema}.{table}: {len(add)} file(s)", rows)
        return _ndjson(lines, delta.version())

    @app.get(f"{PREFIX}/files/{{share}}/{{table}}/{{path:path}}")
    def file(share: str, table: str, path: str, expires: int, token: str, sig: str, request: Request):
        expected = _sign(gateway.signing_key, share, table, path, expires, token)
        if not hmac.compare_digest(expected, sig) or expires < time.time():
            raise GatewayError(403, "PERMISSION_DENIED", "invalid or expired file URL")
        # The URL was handed to this token: it dies with the token and with the user's membership.
        record = gateway.tokens.records().get(token)
        consortium = gateway.consortium.get()
        event = {"user": record.user if record else UNKNOWN_USER, "token_id": token, "project_id": share,
                 "purpose": consortium.projects[share].purpose if share in consortium.projects else None,
                 "action": ACTION_SHARING, "engine": ENGINE, "policy_version": consortium.policy_version or "-"}
        try:
            if record is None or record.state(clock.today()) != "active" or record.project_id != share:
                raise AccessDenied(f"token {token} is no longer valid for {share}")
            check_access(consortium, share, record.user, clock.today())
        except AccessDenied as exc:
            _refuse(event, 403, "PERMISSION_DENIED", str(exc))
        parts = PurePosixPath(path).parts
        if not parts or ".." in parts or "_delta_log" in parts or path.startswith("/"):
            _refuse(event, 404, "NOT_FOUND", "no such file")
        if not gateway.settings.local_lake:
            # An object-store lake: the gateway reads the object with its own read-only credentials and
            # passes it on, so the URL stays revocable and audited (see the module docstring).
            store = object_store()
            key = f"{_object_prefix(gateway.lake.project(share, table))}/{path}"
            info = store.get_file_info(key)
            if info.type != FileType.File:
                _refuse(event, 404, "NOT_FOUND", "no such file")
            span = byte_range(request.headers.get("range"), info.size)
            if span is None:
                raise GatewayError(416, "RANGE_NOT_SATISFIABLE", f"the file holds {info.size} bytes")
            _allowed(event, f"file {table}/{path} {request.headers.get('range', 'whole')}")
            return _object_response(store, key, span, info.size, partial="range" in request.headers)
        root = Path(gateway.lake.project(share, table)).resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or "_delta_log" in target.parts or not target.is_file():
            _refuse(event, 404, "NOT_FOUND", "no such file")
        _allowed(event, f"file {table}/{path} {request.headers.get('range', 'whole')}")
        return FileResponse(target, media_type="application/octet-stream")


CHUNK_BYTES = 1 << 20


@functools.cache
def object_store():
    """The object store of an ``s3a://`` lake, from the standard ``AWS_*`` variables (the gateway's own user),
    made once per process."""
    from pyarrow.fs import S3FileSystem

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    options = {"access_key": os.environ.get("AWS_ACCESS_KEY_ID"), "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
               "region": os.environ.get("AWS_REGION", "us-east-1"),
               "scheme": "http" if endpoint.startswith("http://") else "https"}
    if endpoint:
        options["endpoint_override"] = endpoint
    return S3FileSystem(**{k: v for k, v in options.items() if v is not None})


def _object_prefix(uri: str) -> str:
    """``s3a://bucket/lake/projects/p/t`` → ``bucket/lake/projects/p/t`` (pyarrow's spelling)."""
    return uri.split("://", 1)[1].rstrip("/")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte of an HTTP ``Range: bytes=…`` header (one range), the whole file without one;
    ``None`` when the range cannot be served."""
    if not header:
        return (0, size - 1)
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec or "-" not in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    return (start, end) if 0 <= start <= end < size else None


def _object_response(store, key: str, span: tuple[int, int], size: int, partial: bool) -> StreamingResponse:
    start, end = span

    def chunks():
        with store.open_input_file(key) as handle:
            handle.seek(start)
            left = end - start + 1
            while left > 0:
                data = handle.read(min(CHUNK_BYTES, left))
                if not data:
                    break
                left -= len(data)
                yield data

    headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start + 1)}
    if partial:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(chunks(), status_code=206 if partial else 200, headers=headers,
                             media_type="application/octet-stream")
