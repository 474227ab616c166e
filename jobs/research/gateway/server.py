"""Starting the gateway: refuse a visible key, confine the process, then serve.

Nothing here imports pyarrow, deltalake or DuckDB at module level: they start
threads, and Landlock must be applied while the process has only its main
thread. :func:`serve` imports the application only once confined.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.research.gateway.confine import (Confinement, ConfinementUnavailable, confine, python_paths,
                                  refuse_if_key_visible, system_paths)
from jobs.research.gateway import ACCESS_AUDIT, PRIVACY_LEDGER
from jobs.core.lake import GOLD, PROJECTS, Lake
from jobs.core.settings import PROJECT_ROOT

ENV_GATEWAY_HOST = "AFFLUENT_GATEWAY_HOST"
ENV_GATEWAY_PORT = "AFFLUENT_GATEWAY_PORT"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway process reads: no key, no other zone."""

    lake_root: str
    config_dir: Path
    token_store: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    temp_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    @property
    def lake(self) -> Lake:
        return Lake(self.lake_root)

    @property
    def local_lake(self) -> bool:
        return "://" not in self.lake_root

    @classmethod
    def from_env(cls, **overrides) -> "GatewaySettings":
        from jobs.research.gateway.tokens import default_store_path
        from jobs.core.settings import Settings

        base = Settings.from_env()
        values: dict[str, Any] = {"lake_root": base.lake_root, "config_dir": base.config_dir,
                  "host": os.environ.get(ENV_GATEWAY_HOST, DEFAULT_HOST),
                  "port": int(os.environ.get(ENV_GATEWAY_PORT, DEFAULT_PORT))}
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["config_dir"] = Path(values["config_dir"]).resolve()
        if values.get("token_store") is None:
            values["token_store"] = default_store_path(values["lake_root"])
        values["token_store"] = Path(values["token_store"]).resolve()
        if "://" not in values["lake_root"]:
            values["lake_root"] = str(Path(values["lake_root"]).resolve())
        return cls(**values)


def confinement_for(settings: GatewaySettings, private_tmp: Path) -> Confinement:
    """Read-only: Python, system, code, config, ``projects/``, ``gold/``, tokens. Read-write: audit, ledger, temp."""
    read_only = [*python_paths(), *system_paths(), PROJECT_ROOT / "jobs", settings.config_dir,
                 settings.token_store.parent]
    read_write = [private_tmp]
    if settings.local_lake:
        lake = settings.lake
        read_only += [Path(lake.zone(PROJECTS)), Path(lake.zone(GOLD))]
        read_write += [Path(lake.ops(ACCESS_AUDIT)), Path(lake.ops(PRIVACY_LEDGER))]
        # A folder that holds the lake would open every zone: refuse rather than widen the rules.
        for path in (settings.config_dir, settings.token_store.parent):
            if Path(settings.lake_root).resolve().is_relative_to(path.resolve()):
                raise ConfinementUnavailable(f"{path} contains the lake {settings.lake_root}; put the configuration "
                                             "and the token store outside the lake")
    return Confinement(read_only=tuple(read_only), read_write=tuple(read_write))


def prepare(settings: GatewaySettings) -> tuple[Path, Confinement]:
    """Create the folders the rules name (a Landlock rule needs an existing path) and a private temp dir."""
    private_tmp = Path(tempfile.mkdtemp(prefix="affluent-gateway-", dir=settings.temp_dir))
    rules = confinement_for(settings, private_tmp)
    if settings.local_lake:
        for path in (*rules.read_write, Path(settings.lake.zone(PROJECTS)), Path(settings.lake.zone(GOLD))):
            path.mkdir(parents=True, exist_ok=True)
    settings.token_store.parent.mkdir(parents=True, exist_ok=True)
    return private_tmp, rules


def lock_down(settings: GatewaySettings, unconfined: bool = False) -> Path:
    """Refuse a visible key, then confine this process; return its private temp folder.

    Raises :class:`jobs.research.gateway.confine.KeyVisibleError` or
    :class:`jobs.research.gateway.confine.ConfinementUnavailable` (unless ``unconfined``).
    """
    refuse_if_key_visible()
    private_tmp, rules = prepare(settings)
    if unconfined:
        print("WARNING: the gateway runs UNCONFINED (--unconfined): researcher SQL runs in a process that can "
              "open every file this user can. Use this only where Landlock is unavailable and the process is "
              "confined otherwise (container, separate user).", file=sys.stderr)
    else:
        try:
            confine(rules)
        except ConfinementUnavailable as exc:
            raise ConfinementUnavailable(f"{exc}. The gateway refuses to run unconfined; start it with "
                                         "--unconfined only if it is confined by other means.") from None
    os.environ["TMPDIR"] = str(private_tmp)
    tempfile.tempdir = str(private_tmp)
    return private_tmp


def serve(settings: GatewaySettings, unconfined: bool = False) -> None:
    """Lock down, then run the HTTP service until interrupted."""
    private_tmp = lock_down(settings, unconfined)
    import uvicorn

    from jobs.research.gateway.app import create_app

    app = create_app(settings, temp_dir=private_tmp, confined=not unconfined)
    print(f"Affluent gateway on http://{settings.host}:{settings.port} (lake {settings.lake_root}, "
          f"{'confined' if not unconfined else 'UNCONFINED'})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
