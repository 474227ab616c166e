"""No key, padded key or derived key ever shows in a Spark plan or the event log."""

import contextlib
import hashlib
import hmac
import io

import pytest
from pyspark.sql import functions as F

from jobs.privacy.crypto import SparkKey, _padded, hmac_sha256_hex
from jobs.core.lake import Lake
from jobs.stages.pseudonymise import Keyring, Parser, pseudonymise_facts, pseudonymise_patients
from jobs.stages.publish import project_extract
from tests.privacy_helpers import EST, encodings, event_log_text
from tests.test_publish import C


def _explained(df) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        df.explain(mode="extended")
    return out.getvalue()


def _secrets(key, consortium) -> dict[str, bytes]:
    keys = {"secret": key.secret, "person": key.person_key()}
    keys |= {f"establishment:{e}": key.establishment_key(e) for e in consortium.establishments}
    keys |= {f"project:{p}": key.project_key(p) for p in consortium.projects}
    keys |= {f"date-shift:{p}": key.derive(f"project-date-shift:{p}") for p in consortium.projects}
    out = {}
    for name, secret in keys.items():
        ipad, opad = _padded(secret)
        out |= {name: secret, f"{name} ipad": ipad, f"{name} opad": opad}
    return out


def test_spark_hmac_equals_python_hmac(spark):
    values = ["ABCD12345678", "é-accentué", "x" * 200, None, ""]
    df = spark.createDataFrame([(v,) for v in values], "v string")
    for key in (b"k" * 32, b"long-key-" * 20):
        got = [r.h for r in df.select(hmac_sha256_hex(SparkKey(spark, key), "v").alias("h")).collect()]
        assert got == [hmac.new(key, v.encode(), hashlib.sha256).hexdigest() if v else None for v in values]


def test_raw_key_bytes_are_refused():
    with pytest.raises(TypeError, match="SparkKey"):
        hmac_sha256_hex(b"k" * 32, "v")


def test_no_key_in_any_plan_or_event_log(spark, consortium, pseudonym_key, planted_lake, erased_history):
    """Every stage ran in this session before the scan: the planted batch from landing to its extracts
    (``planted_lake``), publish and erasure on a small silver history (``erased_history``)."""
    lake = Lake(str(planted_lake / "lake"))
    published, shipped = erased_history["lake"], erased_history["consortium"]
    keyring = Keyring.for_establishment(spark, pseudonym_key, EST)
    parser = Parser(consortium.establishment(EST))
    bronze = spark.read.format("delta")
    plans = [
        _explained(pseudonymise_patients(bronze.load(lake.bronze("patient")), keyring, parser)),
        _explained(pseudonymise_facts(bronze.load(lake.bronze("encounter")), "encounter", keyring, parser)),
    ]
    silver = spark.read.format("delta").load(published.silver("patient"))
    for project in shipped.projects.values():
        extract = project_extract(silver, "patient", project, [C], silver.select("person_id"),
                                  SparkKey(spark, pseudonym_key.project_key(project.id)),
                                  SparkKey(spark, pseudonym_key.derive(f"project-date-shift:{project.id}")))
        plans.append(_explained(extract))
    text = "\n".join(plans) + event_log_text(spark)
    assert "Scan ExistingRDD" in text and "SQLExecutionStart" in text  # the plans and the log were read
    for name, secret in (_secrets(pseudonym_key, consortium) | _secrets(pseudonym_key, shipped)).items():
        for shown in encodings(secret):
            assert shown not in text, f"{name} shows in a plan or the event log"


def test_a_literal_key_would_be_found(spark):
    """The scan above can fail: a key passed as a literal shows in the plan."""
    secret = b"s" * 32
    ipad, _ = _padded(secret)
    plan = _explained(spark.range(1).select(F.sha2(F.concat(F.lit(ipad), F.lit(b"x")), 256)))
    assert any(shown in plan for shown in encodings(ipad))
