"""HMAC-SHA256 from Spark built-in functions, so that keying runs in the JVM.

HMAC(K, m) = H((K ^ opad) || H((K ^ ipad) || m)). Both padded keys are
computed once in Python; per row only ``sha2`` and ``concat`` run.

The padded keys never enter a plan as literals: Spark plans, the Spark UI and
event logs print literals, and XOR with 0x36 or 0x5C turns a printed pad back
into the key. They travel as *data* instead: a one-row DataFrame built from an
RDD (a plan prints ``Scan ExistingRDD``, never the rows of an RDD, unlike a
``LocalRelation``), read through scalar subqueries. A null or empty message
gives null: HMAC of "" would merge everyone without an identifier.
"""

from __future__ import annotations

import hashlib

from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BinaryType, StructField, StructType

_BLOCK = 64
_PADS_SCHEMA = StructType([StructField("ipad", BinaryType(), False), StructField("opad", BinaryType(), False)])


def _padded(key: bytes) -> tuple[bytes, bytes]:
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\x00")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


class SparkKey:
    """An HMAC key usable in Spark expressions without ever being a literal of the plan.

    ``repr`` never shows the key. Build one per key and job; it holds a
    reference to ``spark``.

    Example::

        person = SparkKey(spark, key.person_key())
        df.withColumn("person_id", hmac_sha256_hex(person, "nam_normalised"))
    """

    def __init__(self, spark: SparkSession, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or not key:
            raise TypeError("SparkKey needs the key as non-empty bytes")
        ipad, opad = _padded(bytes(key))
        # An RDD, not createDataFrame(list): a LocalRelation prints its rows in explain() and event logs.
        rows = spark.sparkContext.parallelize([(bytearray(ipad), bytearray(opad))], 1)
        pads = spark.createDataFrame(rows, _PADS_SCHEMA)
        self._ipad = pads.select("ipad").scalar()
        self._opad = pads.select("opad").scalar()

    def __repr__(self) -> str:
        return "SparkKey(<secret>)"

    __str__ = __repr__

    @property
    def ipad(self) -> Column:
        return self._ipad

    @property
    def opad(self) -> Column:
        return self._opad


def hmac_sha256_hex(key: SparkKey, message: Column | str) -> Column:
    """Hex HMAC-SHA256 of a string column under ``key``; null for null or empty input.

    Example::

        df.withColumn("person_id", hmac_sha256_hex(SparkKey(spark, key.person_key()), "nam_normalised"))
    """
    if not isinstance(key, SparkKey):
        raise TypeError("hmac_sha256_hex takes a SparkKey: raw key bytes would become a literal of the plan")
    msg = F.col(message) if isinstance(message, str) else message
    inner = F.unhex(F.sha2(F.concat(key.ipad, F.encode(msg, "UTF-8")), 256))
    outer = F.sha2(F.concat(key.opad, inner), 256)
    return F.when(msg.isNull() | (F.length(msg) == 0), F.lit(None).cast("string")).otherwise(outer)
