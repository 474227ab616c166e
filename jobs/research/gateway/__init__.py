"""The researcher gateway: the only door researchers use.

A service of its own (``affluent gateway``) that holds no pseudonymisation
key, reads only ``projects/`` and ``gold/`` of the lake, the project
configuration and its token store, and appends to the access audit through one
writer. It answers:

- ``POST /v1/projects/{project}/query`` and ``.../export``: DuckDB SQL over
  the project's extract (:mod:`jobs.research.access`), output-checked
  (:mod:`jobs.privacy.disclosure`);
- the Delta Sharing protocol under ``/delta-sharing`` (:mod:`jobs.research.gateway.sharing`).

Users are known from bearer tokens (:mod:`jobs.research.gateway.tokens`); every
request, allowed or refused, is in the tamper-evident audit
(:mod:`jobs.research.gateway.audit`) before anything leaves. See docs/security.md.
"""

# The audit table under ops/ (named here so that the start-up code can confine the
# process before anything imports pyarrow).
ACCESS_AUDIT = "access_audit"
# The privacy-budget ledger of aggregate-only projects under ops/ (see jobs.privacy.privacy_budget).
PRIVACY_LEDGER = "privacy_ledger"
