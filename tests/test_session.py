import hashlib
import hmac

import pytest
from pyspark.sql import Row

# The suite runs Spark interpreted (tests/conftest.py); production compiles. Checks whose
# result must not depend on it run both ways.
EXECUTION_MODES = {"compiled": {"spark.sql.codegen.wholeStage": "true", "spark.sql.codegen.factoryMode": "CODEGEN_ONLY"},
                   "interpreted": {"spark.sql.codegen.wholeStage": "false", "spark.sql.codegen.factoryMode": "NO_CODEGEN"}}


@pytest.fixture(params=sorted(EXECUTION_MODES))
def execution_mode(request, spark):
    previous = {k: spark.conf.get(k, None) for k in EXECUTION_MODES[request.param]}
    for key, value in EXECUTION_MODES[request.param].items():
        spark.conf.set(key, value)
    yield request.param
    for key, value in previous.items():
        if value is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, value)


def test_delta_round_trip_through_the_session_factory(spark, tmp_path):
    path = str(tmp_path / "round_trip")
    rows = [Row(id=1, name="a"), Row(id=2, name=None)]
    spark.createDataFrame(rows, "id int, name string").write.format("delta").save(path)
    back = spark.read.format("delta").load(path).orderBy("id").collect()
    assert back == rows
    history = spark.sql(f"DESCRIBE HISTORY delta.`{path}`").collect()
    assert len(history) == 1


def test_hmac_from_builtins_equals_python_hmac(spark, execution_mode):
    from jobs.privacy.crypto import SparkKey, hmac_sha256_hex

    values = ["ABCD12345678", "é-accentué", "x" * 200, None, ""]
    df = spark.createDataFrame([(v,) for v in values], "v string")
    for key in (b"k" * 32, b"long-key-" * 20):
        got = [r.h for r in df.select(hmac_sha256_hex(SparkKey(spark, key), "v").alias("h")).collect()]
        expected = [hmac.new(key, v.encode(), hashlib.sha256).hexdigest() if v else None for v in values]
        assert got == expected


def test_code_generation_switch(monkeypatch):
    from jobs.core.session import ENV_CODEGEN, codegen_conf

    monkeypatch.delenv(ENV_CODEGEN, raising=False)
    assert codegen_conf() == {}
    monkeypatch.setenv(ENV_CODEGEN, "off")
    assert codegen_conf() == {"spark.sql.codegen.wholeStage": "false", "spark.sql.codegen.factoryMode": "NO_CODEGEN"}
    monkeypatch.setenv(ENV_CODEGEN, "maybe")
    with pytest.raises(ValueError, match="AFFLUENT_SPARK_CODEGEN='maybe'"):
        codegen_conf()


def test_adaptive_execution_switch(monkeypatch):
    from jobs.core.session import ENV_ADAPTIVE, ENV_CODEGEN, adaptive_conf, execution_mode_conf

    monkeypatch.delenv(ENV_ADAPTIVE, raising=False)
    monkeypatch.delenv(ENV_CODEGEN, raising=False)
    assert adaptive_conf() == {} and execution_mode_conf() == {}
    monkeypatch.setenv(ENV_ADAPTIVE, "off")
    assert execution_mode_conf() == {"spark.sql.adaptive.enabled": "false"}
    monkeypatch.setenv(ENV_ADAPTIVE, "sometimes")
    with pytest.raises(ValueError, match="AFFLUENT_SPARK_ADAPTIVE='sometimes'"):
        adaptive_conf()


def test_the_suite_session_runs_as_its_environment_says(spark):
    import os

    from jobs.core.session import ENV_ADAPTIVE, ENV_CODEGEN

    interpreted = os.environ.get(ENV_CODEGEN) == "off"
    assert spark.conf.get("spark.sql.codegen.factoryMode") == ("NO_CODEGEN" if interpreted else "FALLBACK")
    adaptive = os.environ.get(ENV_ADAPTIVE, "on") == "on"
    assert spark.conf.get("spark.sql.adaptive.enabled") == str(adaptive).lower()


def test_a_small_batch_runs_its_session_interpreted_and_a_large_one_gets_the_settings_back(spark, monkeypatch):
    from jobs.core.session import ENV_ADAPTIVE, ENV_CODEGEN, ENV_SHUFFLE_PARTITIONS, ENV_SMALL_BATCH_MB, tune_for_batch

    for name in (ENV_CODEGEN, ENV_ADAPTIVE, ENV_SHUFFLE_PARTITIONS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ENV_SMALL_BATCH_MB, "1")
    session = spark.newSession()  # its own settings: the suite's session is not changed
    session.conf.set("spark.sql.codegen.wholeStage", "true")
    session.conf.set("spark.sql.adaptive.enabled", "true")
    session.conf.set("spark.sql.shuffle.partitions", "6")
    factory_mode = session.conf.get("spark.sql.codegen.factoryMode")

    tune_for_batch(session, 200_000)
    assert session.conf.get("spark.sql.codegen.wholeStage") == "false"
    assert session.conf.get("spark.sql.codegen.factoryMode") == "NO_CODEGEN"
    assert session.conf.get("spark.sql.adaptive.enabled") == "false"
    assert session.conf.get("spark.sql.shuffle.partitions") == "1"
    assert session.range(40).repartition(4).groupBy("id").count().rdd.getNumPartitions() == 1

    tune_for_batch(session, 5 * 1024 * 1024)
    assert session.conf.get("spark.sql.codegen.wholeStage") == "true"
    assert session.conf.get("spark.sql.adaptive.enabled") == "true"
    assert session.conf.get("spark.sql.codegen.factoryMode") == factory_mode
    assert session.conf.get("spark.sql.shuffle.partitions") == "6"

    tune_for_batch(session, 10)
    tune_for_batch(session, None)  # a batch of unknown size (its landing folder is gone): the session's own
    assert session.conf.get("spark.sql.codegen.wholeStage") == "true"
    assert session.conf.get("spark.sql.shuffle.partitions") == "6"


def test_a_pinned_shuffle_partition_count_is_kept_for_a_small_batch(spark, monkeypatch):
    from jobs.core.session import ENV_ADAPTIVE, ENV_CODEGEN, ENV_SHUFFLE_PARTITIONS, tune_for_batch

    monkeypatch.delenv(ENV_CODEGEN, raising=False)
    monkeypatch.delenv(ENV_ADAPTIVE, raising=False)
    monkeypatch.setenv(ENV_SHUFFLE_PARTITIONS, "3")
    session = spark.newSession()
    session.conf.set("spark.sql.shuffle.partitions", "3")
    wanted = tune_for_batch(session, 10)
    assert "spark.sql.shuffle.partitions" not in wanted and wanted["spark.sql.adaptive.enabled"] == "false"
    assert session.conf.get("spark.sql.shuffle.partitions") == "3"


def test_an_explicit_execution_mode_is_not_tuned_and_a_bad_threshold_is_refused(spark, monkeypatch):
    from jobs.core.session import ENV_CODEGEN, ENV_SMALL_BATCH_MB, tune_for_batch

    session = spark.newSession()
    session.conf.set("spark.sql.codegen.wholeStage", "true")
    monkeypatch.setenv(ENV_CODEGEN, "on")
    monkeypatch.setenv("AFFLUENT_SPARK_ADAPTIVE", "on")
    monkeypatch.setenv("AFFLUENT_SHUFFLE_PARTITIONS", "2")
    assert tune_for_batch(session, 10) == {}
    assert session.conf.get("spark.sql.codegen.wholeStage") == "true"

    monkeypatch.delenv(ENV_CODEGEN)
    monkeypatch.setenv(ENV_SMALL_BATCH_MB, "lots")
    with pytest.raises(ValueError, match=ENV_SMALL_BATCH_MB):
        tune_for_batch(session, 10)
