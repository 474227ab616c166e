import hashlib
import hmac

from pyspark.sql import Row


def test_delta_round_trip_through_the_session_factory(spark, tmp_path):
    path = str(tmp_path / "round_trip")
    rows = [Row(id=1, name="a"), Row(id=2, name=None)]
    spark.createDataFrame(rows, "id int, name string").write.format("delta").save(path)
    back = spark.read.format("delta").load(path).orderBy("id").collect()
    assert back == rows
    history = spark.sql(f"DESCRIBE HISTORY delta.`{path}`").collect()
    assert len(history) == 1


def test_hmac_from_builtins_equals_python_hmac(spark):
    from jobs.crypto import SparkKey, hmac_sha256_hex

    values = ["ABCD12345678", "é-accentué", "x" * 200, None, ""]
    df = spark.createDataFrame([(v,) for v in values], "v string")
    for key in (b"k" * 32, b"long-key-" * 20):
        got = [r.h for r in df.select(hmac_sha256_hex(SparkKey(spark, key), "v").alias("h")).collect()]
        expected = [hmac.new(key, v.encode(), hashlib.sha256).hexdigest() if v else None for v in values]
        assert got == expected
