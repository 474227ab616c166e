"""HMAC-SHA256 from Spark built-in functions, so that keying runs in the JVM.

HMAC(K, m) = H((K ^ opad) || H((K ^ ipad) || m)). The key is a constant of
the job, so both padded keys are computed once in Python and enter the plan
as binary literals; per row only ``sha2`` and ``concat`` run. A null or empty
message gives null: HMAC of "" would merge everyone without an identifier.
"""

from __future__ import annotations

import hashlib

from pyspark.sql import Column
from pyspark.sql import functions as F

_BLOCK = 64


def _padded(key: bytes) -> tuple[bytes, bytes]:
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\x00")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def hmac_sha256_hex(key: bytes, message: Column | str) -> Column:
    """Hex HMAC-SHA256 of a string column under ``key``; null for null or empty input.

    Example::

        df.withColumn("person_id", hmac_sha256_hex(key.person_key(), "nam_normalised"))
    """
    ipad, opad = _padded(key)
    msg = F.col(message) if isinstance(message, str) else message
    inner = F.unhex(F.sha2(F.concat(F.lit(ipad), F.encode(msg, "UTF-8")), 256))
    outer = F.sha2(F.concat(F.lit(opad), inner), 256)
    return F.when(msg.isNull() | (F.length(msg) == 0), F.lit(None).cast("string")).otherwise(outer)
