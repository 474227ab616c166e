"""HMAC-SHA256 from Spark built-in functions, so that keying runs in the JVM.

HMAC(K, m) = H((K ^ opad) || H((K ^ ipad) || m)). Both padded keys are
computed once in Python; per row only ``sha2`` and ``concat`` run.

The padded keys never enter a plan as literals: Spark plans, the Spark UI and
event logs print literals, and XOR with 0x36 or 0x5C turns a printed pad back
into the key. They travel as *data* instead: a one-row DataFrame built from an
RDD (a plan prints ``Scan ExistingRDD``, never the rows of an RDD, unlike a
``LocalRelation``), read through scalar subqueries. A null or empty message
gives null: HMAC of "" would merge everyone without an identifier.

Spark Connect has no RDD, and a key the client held would travel in its
requests. Through the Spark service (:mod:`jobs.core.spark_service`) the key
therefore lives with the service: :class:`ServiceKey` names a purpose
("person", "establishment:…"), and a Java function on the service's classpath
(``jvm/KeyedHmac.java``) derives that purpose's sub-key from the key the
service read from its own secret and computes the same HMAC. A Java function,
not built-ins: built-ins would need the key (or its pads) in the plan or as
data the client sends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BinaryType, StructField, StructType

from jobs.core.java import compile_jar, jar_for

_BLOCK = 64
JAVA_SOURCE = Path(__file__).resolve().parent / "jvm" / "KeyedHmac.java"
# Names the keyed functions have in a client's session (registered by :class:`SparkKey`).
HMAC_FUNCTION = "affluent_keyed_hmac"
FINGERPRINT_FUNCTION = "affluent_key_fingerprint"
HMAC_CLASS = "affluent.privacy.KeyedHmac"
FINGERPRINT_CLASS = "affluent.privacy.KeyedHmac$Fingerprint"
_PADS_SCHEMA = StructType([StructField("ipad", BinaryType(), False), StructField("opad", BinaryType(), False)])


def _padded(key: bytes) -> tuple[bytes, bytes]:
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\x00")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def udf_jar() -> Path:
    """Where the compiled keyed functions go: the ignored cache, named by the source's digest."""
    return jar_for(JAVA_SOURCE, "affluent-privacy")


def ensure_udf_jar() -> Path:
    """Compile ``jvm/KeyedHmac.java`` against pyspark's jars into :func:`udf_jar` unless it is there."""
    return compile_jar(JAVA_SOURCE, udf_jar())


@dataclass(frozen=True)
class ServicePurpose:
    """A sub-key of the service's key, named by its purpose only (the service derives the bytes)."""

    purpose: str


class ServiceKey:
    """The pseudonymisation key as a client of the Spark service sees it: its fingerprint and purposes, no bytes.

    Quacks like :class:`jobs.privacy.keys.PseudonymKey` where stages use it
    (``fingerprint``, ``person_key()``, ``establishment_key()``, ``project_key()``,
    ``derive()``), but each sub-key is a :class:`ServicePurpose` that
    :class:`SparkKey` turns into a call of the service's keyed function.

    Example::

        key = ServiceKey(spark)
        df.withColumn("person_id", hmac_sha256_hex(SparkKey(spark, key.person_key()), "nam_normalised"))
    """

    def __init__(self, spark: SparkSession):
        register_keyed_functions(spark)
        self._spark = spark
        # Public and one-way, as PseudonymKey.fingerprint; it fails here when the service holds no key.
        self.fingerprint: str = spark.range(1).select(F.call_function(FINGERPRINT_FUNCTION)).collect()[0][0]

    def __repr__(self) -> str:
        return f"ServiceKey(fingerprint={self.fingerprint})"

    def derive(self, purpose: str) -> ServicePurpose:
        return ServicePurpose(purpose)

    def person_key(self) -> ServicePurpose:
        return self.derive("person")

    def establishment_key(self, establishment_id: str) -> ServicePurpose:
        return self.derive(f"establishment:{establishment_id}")

    def project_key(self, project_id: str) -> ServicePurpose:
        return self.derive(f"project:{project_id}")

    def hmac_hex(self, purpose: ServicePurpose, messages: list[str]) -> list[str]:
        """Hex HMAC-SHA256 of each message under the purpose's sub-key, computed by the service (one job).

        For the few values a steward's command needs as values (an erasure's patient key and project
        pseudonyms): the messages travel to the service as data, the key stays there.
        """
        if not messages:
            return []
        frame = self._spark.createDataFrame([(i, m) for i, m in enumerate(messages)], "i long, m string")
        rows = frame.select("i", hmac_sha256_hex(SparkKey(self._spark, purpose), "m").alias("h")).collect()
        return [h for _, h in sorted((r.i, r.h) for r in rows)]


_REGISTERED: set[str] = set()


def register_keyed_functions(spark: SparkSession) -> None:
    """Make the service's keyed functions callable in ``spark`` (a session of the service), once per session."""
    session = str(getattr(spark, "session_id", id(spark)))
    if session in _REGISTERED:
        return
    spark.udf.registerJavaFunction(HMAC_FUNCTION, HMAC_CLASS, "string")
    spark.udf.registerJavaFunction(FINGERPRINT_FUNCTION, FINGERPRINT_CLASS, "string")
    _REGISTERED.add(session)


class SparkKey:
    """An HMAC key usable in Spark expressions without ever being a literal of the plan.

    ``repr`` never shows the key. Build one per key and job; it holds a
    reference to ``spark``. Given bytes it needs a classic session (the pads
    travel as an RDD); given a :class:`ServicePurpose` it calls the service's
    keyed function, and the client never has the key.

    Example::

        person = SparkKey(spark, key.person_key())
        df.withColumn("person_id", hmac_sha256_hex(person, "nam_normalised"))
    """

    def __init__(self, spark: SparkSession, key: bytes | ServicePurpose):
        self.purpose: str | None = None
        if isinstance(key, ServicePurpose):
            register_keyed_functions(spark)
            self.purpose = key.purpose
            return
        if not isinstance(key, (bytes, bytearray)) or not key:
            raise TypeError("SparkKey needs the key as non-empty bytes")
        from jobs.core.session import is_connect

        if is_connect(spark):
            raise TypeError("SparkKey got key bytes for a Spark Connect session: they would travel to the service "
                            "in the request. Use the service's key (jobs.privacy.crypto.ServiceKey).")
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
    if key.purpose is not None:
        return F.call_function(HMAC_FUNCTION, F.lit(key.purpose), msg)
    inner = F.unhex(F.sha2(F.concat(key.ipad, F.encode(msg, "UTF-8")), 256))
    outer = F.sha2(F.concat(key.opad, inner), 256)
    return F.when(msg.isNull() | (F.length(msg) == 0), F.lit(None).cast("string")).otherwise(outer)
