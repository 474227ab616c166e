"""Commands and Airflow tasks as thin clients of the Spark service.

``affluent run`` (and each stage command), ``affluent demo`` and ``affluent
airflow`` run no Spark of their own: they start the service when none is
running (:func:`jobs.core.spark_service.ensure`), hand it the pseudonymisation
key they were given, drop that key from their own environment, and reach the
service with its address and token — this process through
``AFFLUENT_SPARK_REMOTE``/``AFFLUENT_SPARK_TOKEN``, Airflow's tasks through the
connection ``affluent_spark``. ``--classic`` (or ``AFFLUENT_SPARK_MODE=classic``)
keeps the former in-process Spark.

Example::

    state, started = attach(os.environ)
    become_client(state)          # this process: a Spark Connect client, no key
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

from jobs.core import spark_service
from jobs.core.session import AIRFLOW_CONN_ID, ENV_REMOTE, ENV_TOKEN
from jobs.core.spark_service import KEY_ENVIRONMENT, ServiceState, SparkServiceError

AIRFLOW_CONN_ENV = f"AIRFLOW_CONN_{AIRFLOW_CONN_ID.upper()}"
# What makes an environment a client of some service already: left out of what Airflow is given,
# so that the connection is the one place its tasks read the address from.
_CLIENT_SETTINGS = (ENV_REMOTE, ENV_TOKEN, AIRFLOW_CONN_ENV)


def attach(key_source: Mapping[str, str]) -> tuple[ServiceState, bool]:
    """The running service, or one started with the key of ``key_source``; whether it was started now."""
    from jobs.privacy.keys import MissingKeyError, WeakKeyError

    try:
        return spark_service.ensure(key_source)
    except (MissingKeyError, WeakKeyError) as exc:  # the service reads the key itself: it cannot start without
        raise SparkServiceError(f"cannot start the Spark service: {exc}") from None


def become_client(state: ServiceState) -> None:
    """This process reaches ``state``'s service from now on, and holds no key."""
    os.environ[ENV_REMOTE], os.environ[ENV_TOKEN] = state.address, state.token
    for name in KEY_ENVIRONMENT:
        os.environ.pop(name, None)


def airflow_connection(state: ServiceState) -> str:
    """The ``affluent_spark`` connection (the Spark provider's Spark Connect type) as Airflow reads it from the environment."""
    return json.dumps({"conn_type": "spark_connect", "host": f"sc://{spark_service.CLIENT_HOST}",
                       "port": state.port, "password": state.token})


def airflow_client_env(env: Mapping[str, str], state: ServiceState) -> dict[str, str]:
    """``env`` for Airflow and its tasks: the service's connection, no key, no other service address."""
    client = {name: value for name, value in env.items() if name not in KEY_ENVIRONMENT + _CLIENT_SETTINGS}
    client[AIRFLOW_CONN_ENV] = airflow_connection(state)
    return client


def use_service_here(classic: bool = False) -> ServiceState | None:
    """For a command: become a client of the service (started if need be) unless classic or one is configured.

    Returns the service used, or None when the command runs classic or an
    address is configured already (``AFFLUENT_SPARK_REMOTE``, a remote
    deployment's service: used as it is).
    """
    from jobs.core.session import remote_url

    if spark_service.spark_mode(classic) == spark_service.MODE_CLASSIC or remote_url():
        return None
    state, started = attach(os.environ)
    if started:  # on stderr: stdout carries the command's own results
        print(f"started the Spark service at {state.address} (pid {state.pid}); it keeps running for the next "
              "command, `affluent spark stop` ends it", file=sys.stderr)
    become_client(state)
    return state


def spark_jvms(pid: int) -> list[int]:
    """The Spark driver JVMs among ``pid`` and its descendants (Spark's launcher class on their command line)."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in family:
        try:
            if "org.apache.spark.deploy.SparkSubmit" in process.cmdline():
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
