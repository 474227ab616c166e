"""The gateway's HTTP application (FastAPI): SQL endpoints and Delta Sharing.

Every request is authenticated by its bearer token, authorised against the
project configuration as it is on disk now (re-read when a file changes, so a
member removed from ``config/projects/P.yaml`` loses access at once), and
written to the audit before any byte of result leaves. Refusals answer with
``{"errorCode": ..., "message": ...}`` (the Delta Sharing error shape):
401 for a missing, unknown, revoked or expired token, 403 for another
project's token or a user no longer allowed, 400 for a refused query, 500
(with the audit event id, not the error) when an allowed query fails.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from jobs.research import access

from jobs.core import clock
from jobs.core.config import ConfigError, Consortium, load_consortium
from jobs.research.gateway.audit import AuditWriter
from jobs.research.gateway.server import GatewaySettings
from jobs.research.gateway.tokens import TokenError, TokenRecord, TokenStore, token_id_of
from jobs.privacy.policy import AccessDenied, check_access

UNKNOWN_USER = "(unauthenticated)"


class GatewayError(Exception):
    """A refusal with its HTTP status; already audited when raised."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class QueryRequest(BaseModel):
    sql: str = Field(description="one DuckDB SELECT over the project's datasets")


class ExportRequest(QueryRequest):
    format: str = "csv"


class ConsortiumCache:
    """The configuration, re-read whenever a YAML file under it changes (added, removed, edited)."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._consortium: Consortium | None = None

    def _signature_now(self) -> tuple:
        entries = []
        for path in sorted(self.root.rglob("*.yaml")):
            stat = path.stat()
            entries.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(entries)

    def get(self) -> Consortium:
        with self._lock:
            signature = self._signature_now()
            if signature != self._signature or self._consortium is None:
                self._consortium = load_consortium(self.root)
                self._signature = signature
            return self._consortium


@dataclass
class Gateway:
    """The state of one gateway process."""

    settings: GatewaySettings
    tokens: TokenStore
    consortium: ConsortiumCache
    audit: AuditWriter
    signing_key: bytes
    limits: access.Limits
    confined: bool

    @property
    def lake(self):
        return self.settings.lake

    def write(self, event: dict) -> dict:
        return self.audit.append(event)

    def authorise(self, request: Request, project_id: str, action: str, sql: str | None = None,
                  engine: str = access.ENGINE_DUCKDB, export_format: str | None = None, today: dt.date | None = None):
        """The token's record, the project and the audit event of this request; audited refusal otherwise."""
        today = today or clock.today()
        token = _bearer(request)
        try:
            consortium = self.consortium.get()
        except ConfigError as exc:
            self.write(_event(None, project_id, UNKNOWN_USER, token_id_of(token), action, engine, sql,
                              export_format) | {"outcome": access.OUTCOME_REFUSED,
                                                "reason": f"configuration invalid: {exc}"[:1000]})
            raise GatewayError(503, "CONFIGURATION_INVALID", "the project configuration is invalid; "
                               "the gateway refuses every request until it is fixed") from None
        try:
            record = self.tokens.authenticate(token, today)
        except TokenError as exc:
            self.write(_event(consortium, project_id, UNKNOWN_USER, token_id_of(token), action, engine, sql,
                              export_format) | {"outcome": access.OUTCOME_REFUSED, "reason": str(exc)})
            raise GatewayError(401, "UNAUTHENTICATED", str(exc)) from None
        event = _event(consortium, project_id, record.user, record.token_id, action, engine, sql, export_format)
        try:
            if record.project_id != project_id:
                raise AccessDenied(f"token {record.token_id} is for project {record.project_id!r}, "
                                   f"not {project_id!r}")
            project = check_access(consortium, project_id, record.user, today)
        except AccessDenied as exc:
            self.write(event | {"outcome": access.OUTCOME_REFUSED, "reason": str(exc)})
            raise GatewayError(403, "PERMISSION_DENIED", str(exc)) from None
        return record, project, event

    def token_record(self, request: Request, action: str, target: str) -> tuple[TokenRecord, Consortium]:
        """For listings not tied to one project (Delta Sharing ``/shares``): an active token, audited."""
        token = _bearer(request)
        consortium = self.consortium.get()
        try:
            record = self.tokens.authenticate(token, clock.today())
        except TokenError as exc:
            self.write(_event(consortium, target, UNKNOWN_USER, token_id_of(token), action, "delta-sharing", None,
                              None) | {"outcome": access.OUTCOME_REFUSED, "reason": str(exc)})
            raise GatewayError(401, "UNAUTHENTICATED", str(exc)) from None
        return record, consortium


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _event(consortium: Consortium | None, project_id: str, user: str, token_id: str | None, action: str,
           engine: str, sql: str | None, export_format: str | None) -> dict:
    project = consortium.projects.get(project_id) if consortium else None
    event = {"user": user, "token_id": token_id, "project_id": project_id or "-",
             "purpose": project.purpose if project else None, "action": action, "engine": engine,
             "policy_version": (consortium.policy_version if consortium else None) or "-",
             "export_format": export_format}
    if sql is not None:
        import hashlib

        event["sql"] = sql[:access.AUDIT_SQL_CHARS]
        event["sql_sha256"] = hashlib.sha256(sql.encode("utf-8")).hexdigest()
    return event


def _run(gateway: Gateway, event: dict, project, sql: str, render=None) -> tuple[access.Answer, dict, object]:
    """Answer ``sql``, render it (JSON rows by default) and audit the outcome, durable before the caller responds.

    A ``requested`` row (with the budget the query will spend) is durable
    before the query reads data, so a query killed mid-way leaves its request.
    """
    def requested(note: str) -> str:
        return gateway.write(event | {"outcome": access.OUTCOME_REQUESTED, "reason": note})["event_id"]

    try:
        result = access.answer(gateway.lake, project, sql, gateway.limits, user=event["user"], on_start=requested)
        # Rendered before the outcome row, so that a result that cannot be rendered is not audited as allowed.
        rendered = render(result.table) if render is not None else _json_rows(result.table)
    except AccessDenied as exc:
        gateway.write(event | {"outcome": access.OUTCOME_REFUSED, "reason": str(exc)[:1000]})
        raise GatewayError(400, "QUERY_REFUSED", str(exc)) from None
    except RecursionError:
        reason = "the query is nested too deeply"
        gateway.write(event | {"outcome": access.OUTCOME_REFUSED, "reason": reason})
        raise GatewayError(400, "QUERY_REFUSED", reason) from None
    except Exception as exc:
        row = gateway.write(event | {"outcome": access.OUTCOME_FAILED,
                                     "reason": f"{type(exc).__name__}: {exc}"[:1000]})
        if _compile_error(exc):
            # Parser, binder and catalog errors are about the SQL text, not the data: safe to show.
            raise GatewayError(400, "QUERY_FAILED", str(exc).splitlines()[0][:500]) from None
        if _run_error(exc):
            # Errors raised while reading rows may quote a value (a failed cast): name the kind only.
            raise GatewayError(400, "QUERY_FAILED", f"the query failed while running ({type(exc).__name__}); "
                               f"audit event {row['event_id']}") from None
        raise GatewayError(500, "INTERNAL_ERROR", f"the query failed (audit event {row['event_id']})") from None
    notes = ([f"{result.suppressed_cells} cell(s) suppressed"] if result.suppressed_cells else []) + result.notes
    row = gateway.write(event | {"outcome": access.OUTCOME_ALLOWED, "rows_returned": result.table.num_rows,
                                 "reason": "; ".join(notes)[:1000] or None})
    return result, row, rendered


def _compile_error(exc: Exception) -> bool:
    import duckdb

    return isinstance(exc, (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException))


def _run_error(exc: Exception) -> bool:
    import duckdb

    return isinstance(exc, duckdb.Error)


def _json_rows(table) -> list[list]:
    import json

    rows = table.to_pylist()
    names = table.column_names
    return json.loads(json.dumps([[row[n] for n in names] for row in rows], default=str))


def create_app(settings: GatewaySettings, temp_dir: Path | None = None, confined: bool = False,
               limits: access.Limits = access.DEFAULT_LIMITS) -> FastAPI:
    """The gateway application for ``settings`` (confinement is applied by :func:`jobs.research.gateway.server.serve`)."""
    from jobs.research.gateway import sharing

    gateway = Gateway(settings=settings, tokens=TokenStore(settings.token_store),
                      consortium=ConsortiumCache(settings.config_dir),
                      audit=AuditWriter(settings.lake, lock_dir=None if settings.local_lake else temp_dir),
                      signing_key=secrets.token_bytes(32), limits=limits, confined=confined)
    app = FastAPI(title="Affluent researcher gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(GatewayError)
    async def _refused(request: Request, exc: GatewayError):
        return JSONResponse({"errorCode": exc.code, "message": exc.message}, status_code=exc.status)

    @app.get("/v1/health")
    def health():
        return {"status": "ok", "confined": gateway.confined}

    @app.post("/v1/projects/{project_id}/query")
    def query(project_id: str, body: QueryRequest, request: Request):
        _, project, event = gateway.authorise(request, project_id, access.ACTION_QUERY, body.sql)
        result, row, rows = _run(gateway, event, project, body.sql)
        answer = {"columns": result.table.column_names, "rows": rows,
                  "suppressed_cells": result.suppressed_cells, "notes": result.notes, "audit_event": row["event_id"]}
        if result.epsilon is not None:
            answer["privacy"] = {"epsilon": result.epsilon, "delta": result.delta, "budget_left": result.budget_left,
                                 "interval": "95 %: <column>_low95 .. <column>_high95"}
        return answer

    @app.post("/v1/projects/{project_id}/export")
    def export(project_id: str, body: ExportRequest, request: Request):
        _, project, event = gateway.authorise(request, project_id, access.ACTION_EXPORT, body.sql,
                                              export_format=body.format)
        if body.format not in access.EXPORT_FORMATS:
            reason = f"unknown export format {body.format!r}; use one of {', '.join(access.EXPORT_FORMATS)}"
            gateway.write(event | {"outcome": access.OUTCOME_REFUSED, "reason": reason})
            raise GatewayError(400, "QUERY_REFUSED", reason)
        result, row, payload = _run(gateway, event, project, body.sql,
                                    render=lambda table: access.encode(table, body.format))
        media = "text/csv; charset=utf-8" if body.format == "csv" else "application/vnd.apache.parquet"
        return Response(payload, media_type=media, headers={
            "x-affluent-audit-event": row["event_id"], "x-affluent-rows": str(result.table.num_rows),
            "x-affluent-suppressed-cells": str(result.suppressed_cells)}
            | ({"x-affluent-epsilon": f"{result.epsilon:g}", "x-affluent-delta": f"{result.delta:g}"}
               if result.epsilon is not None else {}))

    sharing.add_routes(app, gateway)
    return app
