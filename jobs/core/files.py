"""The lake's files seen from Python: listing, deleting, writing a page, on a local disk or object storage.

A Spark Connect client has no JVM in its process, so Hadoop's file system is
out of reach; Arrow's file systems read the same folders from Python, with the
same ``AWS_*`` environment as every other AWS client (jobs.core.arrow_tables).
Paths keep the form Spark gives them (``file:/…`` for local files,
``s3a://bucket/…``) so that they can be handed back to Spark.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from pyarrow import fs as pafs


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """Arrow's file system for ``path`` and the path as that file system names it."""
    if path.startswith("s3a://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
        scheme = urlparse(endpoint).scheme if endpoint else "https"
        s3 = pafs.S3FileSystem(endpoint_override=endpoint, scheme=scheme or "https",
                               region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
        return s3, path.removeprefix("s3a://").rstrip("/")
    return pafs.LocalFileSystem(), path.removeprefix("file://").removeprefix("file:").rstrip("/") or "/"


def qualified(path: str) -> str:
    """``path`` as Hadoop qualifies it (``file:/abs/path``, ``s3a://bucket/key``): the form of Spark's file columns."""
    if path.startswith("s3a://"):
        return path.rstrip("/")
    return "file:" + os.path.abspath(path.removeprefix("file://").removeprefix("file:"))


def spark_path(path: str, name: str) -> str:
    """``name`` (as Arrow names it, under ``path``'s file system) in the form Spark writes."""
    return f"s3a://{name}" if path.startswith("s3a://") else f"file:{name}"


def _info(fs: pafs.FileSystem, name: str) -> pafs.FileInfo:
    return fs.get_file_info(name)


def exists(path: str) -> bool:
    fs, name = filesystem(path)
    return _info(fs, name).type != pafs.FileType.NotFound


def list_folders(path: str) -> list[str]:
    """Names of the folders directly in ``path``, sorted; none when ``path`` does not exist."""
    fs, name = filesystem(path)
    if _info(fs, name).type == pafs.FileType.NotFound:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(name)) if i.type == pafs.FileType.Directory)


def list_files(path: str, recursive: bool = False) -> list[str]:
    """Files under ``path`` (Arrow's names), sorted; none when ``path`` does not exist."""
    fs, name = filesystem(path)
    if _info(fs, name).type == pafs.FileType.NotFound:
        return []
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(name, recursive=recursive))
                  if i.type == pafs.FileType.File)


def delete_file(path: str, name: str) -> None:
    """Delete ``name`` (an entry of :func:`list_files` of ``path``)."""
    fs, _ = filesystem(path)
    fs.delete_file(name)


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything in it; nothing when it does not exist."""
    fs, name = filesystem(path)
    info = _info(fs, name)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(name)
    elif info.type == pafs.FileType.File:
        fs.delete_file(name)


def write_text(path: str, text: str) -> None:
    """Write a UTF-8 file at ``path``, replacing it (its folder is created)."""
    fs, name = filesystem(path)
    parent = name.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(name) as out:
        out.write(text.encode("utf-8"))
