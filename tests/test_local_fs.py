"""The local file system of a local-master session: Hadoop's answers, no process started for them."""

from __future__ import annotations

import os
import subprocess

import pytest

from jobs.core import local_fs


def _jvm(spark):
    return spark.sparkContext._jvm  # noqa: SLF001 - the suite's session is classic


def _local(spark, cls: str):
    jvm = _jvm(spark)
    conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001
    fs = jvm.org.apache.hadoop.fs.FileSystem.get(jvm.java.net.URI("file:///"), conf)
    assert fs.getClass().getName() == cls
    return fs


def test_the_suite_session_uses_the_forkless_file_system_on_both_hadoop_apis(spark, tmp_path):
    jvm = _jvm(spark)
    conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001
    assert conf.get("fs.file.impl") == local_fs.FILE_SYSTEM_CLASS
    assert conf.get("fs.AbstractFileSystem.file.impl") == local_fs.FILE_CONTEXT_CLASS
    _local(spark, local_fs.FILE_SYSTEM_CLASS)
    context = jvm.org.apache.hadoop.fs.FileContext.getFileContext(jvm.java.net.URI("file:///"), conf)
    assert context.getDefaultFileSystem().getClass().getName() == local_fs.FILE_CONTEXT_CLASS
    # A Delta table written and read back through it.
    path = str(tmp_path / "t")
    spark.range(3).write.format("delta").save(path)
    spark.range(3, 5).write.format("delta").mode("append").save(path)
    assert sorted(r.id for r in spark.read.format("delta").load(path).collect()) == [0, 1, 2, 3, 4]


def test_permissions_are_set_as_hadoop_sets_them(spark, tmp_path):
    jvm = _jvm(spark)
    fs = _local(spark, local_fs.FILE_SYSTEM_CLASS)
    target = tmp_path / "f"
    target.write_text("x")
    for mode in (0o640, 0o755, 0o000, 0o777, 0o1777):  # the sticky bit takes Hadoop's own chmod
        fs.setPermission(jvm.org.apache.hadoop.fs.Path(str(target)), jvm.org.apache.hadoop.fs.permission.FsPermission(mode))
        assert os.stat(target).st_mode & 0o7777 == mode, oct(mode)
    with pytest.raises(Exception, match="NoSuchFile|FileNotFound|No such file"):
        fs.setPermission(jvm.org.apache.hadoop.fs.Path(str(tmp_path / "missing")),
                         jvm.org.apache.hadoop.fs.permission.FsPermission(0o644))


def test_link_status_answers_as_hadoop_for_files_links_and_missing_paths(spark, tmp_path):
    jvm = _jvm(spark)
    raw = _local(spark, local_fs.FILE_SYSTEM_CLASS).getRaw()
    hadoop = jvm.org.apache.hadoop.fs.RawLocalFileSystem()
    hadoop.initialize(jvm.java.net.URI("file:///"), spark.sparkContext._jsc.hadoopConfiguration())  # noqa: SLF001
    (tmp_path / "file").write_text("abc")
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "file", tmp_path / "link")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for name in ("file", "dir", "link", "dangling"):
        path = jvm.org.apache.hadoop.fs.Path(str(tmp_path / name))
        ours, theirs = raw.getFileLinkStatus(path), hadoop.getFileLinkStatus(path)
        assert (ours.isFile(), ours.isDirectory(), ours.isSymlink(), ours.getLen(), ours.getPath().toString()) == \
               (theirs.isFile(), theirs.isDirectory(), theirs.isSymlink(), theirs.getLen(), theirs.getPath().toString()), name
        if theirs.isSymlink():
            assert ours.getSymlink().toString() == theirs.getSymlink().toString()
    with pytest.raises(Exception, match="FileNotFoundException"):
        raw.getFileLinkStatus(jvm.org.apache.hadoop.fs.Path(str(tmp_path / "missing")))


def test_a_rename_onto_an_existing_file_still_fails(spark, tmp_path):
    """Delta's log store commits by renaming onto the next version's file: that must fail when it exists."""
    jvm = _jvm(spark)
    conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001
    context = jvm.org.apache.hadoop.fs.FileContext.getFileContext(jvm.java.net.URI("file:///"), conf)
    (tmp_path / "a").write_text("first")
    (tmp_path / "b").write_text("second")
    none = jvm.org.apache.hadoop.fs.Options.Rename.NONE
    rename_options = spark.sparkContext._gateway.new_array(jvm.org.apache.hadoop.fs.Options.Rename, 1)  # noqa: SLF001
    rename_options[0] = none
    with pytest.raises(Exception, match="FileAlreadyExistsException"):
        context.rename(jvm.org.apache.hadoop.fs.Path(str(tmp_path / "a")), jvm.org.apache.hadoop.fs.Path(str(tmp_path / "b")),
                       rename_options)
    assert (tmp_path / "b").read_text() == "second"
    context.rename(jvm.org.apache.hadoop.fs.Path(str(tmp_path / "a")), jvm.org.apache.hadoop.fs.Path(str(tmp_path / "c")),
                   rename_options)
    assert (tmp_path / "c").read_text() == "first" and not (tmp_path / "a").exists()


def test_only_a_local_master_gets_it_and_hadoop_can_be_kept(monkeypatch):
    assert local_fs.local_fs_conf("spark://master:7077") == {}
    conf = local_fs.local_fs_conf("local[2]")
    assert conf["spark.hadoop.fs.file.impl"] == local_fs.FILE_SYSTEM_CLASS
    assert os.path.isfile(conf["spark.driver.extraClassPath"])
    monkeypatch.setenv(local_fs.ENV_LOCAL_FS, "hadoop")
    assert local_fs.local_fs_conf("local[2]") == {}


def test_without_a_compiler_hadoop_is_kept_with_a_warning(monkeypatch, caplog):
    def no_javac(source, jar):
        raise subprocess.CalledProcessError(127, ["javac"])

    monkeypatch.setattr(local_fs, "compile_jar", no_javac)
    with caplog.at_level("WARNING", logger="jobs.core.local_fs"):
        assert local_fs.local_fs_conf("local[*]") == {}
    assert "ForklessLocalFileSystem.java could not be compiled" in caplog.text


def _forks_since_boot() -> int:
    with open("/proc/stat", encoding="ascii") as stat:
        return next(int(line.split()[1]) for line in stat if line.startswith("processes "))


def test_no_process_is_started_for_a_permission_or_a_link_status(spark, tmp_path):
    """What the subclass is for: Hadoop's own starts one process per call, it starts none."""
    if not os.path.exists("/proc/stat"):
        pytest.skip("counts processes through Linux's /proc/stat")
    jvm = _jvm(spark)
    ours = _local(spark, local_fs.FILE_SYSTEM_CLASS).getRaw()
    hadoop = jvm.org.apache.hadoop.fs.RawLocalFileSystem()
    hadoop.initialize(jvm.java.net.URI("file:///"), spark.sparkContext._jsc.hadoopConfiguration())  # noqa: SLF001
    target = tmp_path / "f"
    target.write_text("x")
    path, mode = jvm.org.apache.hadoop.fs.Path(str(target)), jvm.org.apache.hadoop.fs.permission.FsPermission(0o640)
    calls = 250
    started = {}
    for name, fs in (("hadoop", hadoop), ("ours", ours)):
        before = _forks_since_boot()
        for _ in range(calls):
            fs.setPermission(path, mode)
            fs.getFileLinkStatus(path)
        started[name] = _forks_since_boot() - before
    # Every process of the machine counts: the margin leaves room for the suite's background work.
    assert started["hadoop"] >= 2 * calls, started
    assert started["ours"] < started["hadoop"] / 4, started
