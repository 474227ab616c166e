"""The lake's files from Python (jobs.core.files), and the one-partition rule a Spark Connect client applies."""

from __future__ import annotations

import pytest

from jobs.core import files
from jobs.readers.lines import fits_one_split


def test_folders_files_pages_and_removal(tmp_path):
    root = tmp_path / "zone"
    assert files.list_folders(str(root)) == [] and files.list_files(str(root)) == []
    files.write_text(f"file:{root}/b/report.html", "<p>é</p>")
    (root / "a" / "_delta_log").mkdir(parents=True)
    (root / "a" / "_delta_log" / "00000000000000000000.json").write_text("{}")
    assert files.list_folders(str(root)) == ["a", "b"]
    assert (root / "b" / "report.html").read_text(encoding="utf-8") == "<p>é</p>"
    listed = files.list_files(str(root), recursive=True)
    assert [files.spark_path(str(root), f) for f in listed] == [
        f"file:{root}/a/_delta_log/00000000000000000000.json", f"file:{root}/b/report.html"]
    files.delete_file(str(root), listed[0])
    assert files.list_files(str(root / "a"), recursive=True) == []
    files.remove_tree(str(root))
    assert not root.exists() and not files.exists(str(root))
    files.remove_tree(str(root))  # nothing to remove: no error


@pytest.mark.parametrize("size", [1_000, 3_000_000, 9_000_000])
def test_the_size_rule_agrees_with_the_planned_scan(spark, tmp_path, size):
    """A Connect client has no RDD to ask; its rule must give the classic session's answer."""
    path = tmp_path / f"lines-{size}.txt"
    path.write_bytes((b"x" * 99 + b"\n") * (size // 100))
    planned = spark.read.format("text").load(str(path)).rdd.getNumPartitions() == 1
    assert fits_one_split(spark, str(path)) == planned
