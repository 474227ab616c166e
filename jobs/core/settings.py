"""Run-time settings read from the environment, with embedded defaults.

Only non-secret settings live here; the pseudonymisation key is read by
:mod:`jobs.privacy.keys` so that it never travels with ordinary configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_MASTER = "local[*]"
ENV_MASTER = "AFFLUENT_SPARK_MASTER"
ENV_LAKE_ROOT = "AFFLUENT_LAKE_ROOT"
ENV_CONFIG_DIR = "AFFLUENT_CONFIG_DIR"
ENV_JARS_CACHE = "AFFLUENT_JARS_CACHE"
ENV_LANDING_ROOT = "AFFLUENT_LANDING_ROOT"


@dataclass(frozen=True)
class Settings:
    """Where the lake is, which Spark to use and where the configuration lives."""

    lake_root: str
    spark_master: str
    config_dir: Path
    jars_cache: Path
    landing_root: Path | None = None

    @property
    def landing(self) -> Path:
        """Where establishments drop batches: a folder the pipeline reads (``<lake>/landing`` by default)."""
        if self.landing_root is not None:
            return self.landing_root
        if "://" in self.lake_root:
            raise ValueError(f"the lake is at {self.lake_root}: set {ENV_LANDING_ROOT} to the folder establishments "
                             "deliver to (landing is read from a file system, see docs/deployment.md)")
        return Path(self.lake_root) / "landing"

    @classmethod
    def from_env(cls, **overrides: str) -> "Settings":
        values: dict[str, Any] = {
            "lake_root": os.environ.get(ENV_LAKE_ROOT, str(PROJECT_ROOT / "lake")),
            "spark_master": os.environ.get(ENV_MASTER, DEFAULT_MASTER),
            "config_dir": Path(os.environ.get(ENV_CONFIG_DIR, PROJECT_ROOT / "config")),
            "jars_cache": Path(os.environ.get(ENV_JARS_CACHE, PROJECT_ROOT / ".cache" / "ivy")),
        }
        if os.environ.get(ENV_LANDING_ROOT):
            values["landing_root"] = Path(os.environ[ENV_LANDING_ROOT])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("landing_root") is not None:
            values["landing_root"] = Path(values["landing_root"])
        values["config_dir"] = Path(values["config_dir"])
        values["jars_cache"] = Path(values["jars_cache"])
        return cls(**values)
