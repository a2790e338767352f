"""Deterministic package archives and an extractor that refuses unsafe members before writing."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from lathe.ship.archive import ArchiveError, safe_extract, write_archive


def make_pkg(root: Path) -> Path:
    pkg = root / "edge"
    pkg.mkdir(parents=True)
    (pkg / "model.onnx").write_bytes(b"model-bytes")
    (pkg / "manifest.json").write_text("{}\n")
    return pkg


def test_write_archive_is_deterministic_and_writes_sha256(tmp_path):
    pkg = make_pkg(tmp_path / "a")
    d1 = write_archive(pkg, tmp_path / "one.tar.gz", mtime=1700000000)
    (pkg / "model.onnx").touch()  # file times must not matter
    d2 = write_archive(pkg, tmp_path / "two.tar.gz", mtime=1700000000)
    assert d1 == d2 == hashlib.sha256((tmp_path / "one.tar.gz").read_bytes()).hexdigest()
    assert (tmp_path / "one.tar.gz.sha256").read_text() == f"{d1}  one.tar.gz\n"
    with tarfile.open(tmp_path / "one.tar.gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["edge/manifest.json", "edge/model.onnx"]
    assert all(m.mode == 0o644 and m.uid == 0 and m.uname == "" and m.mtime == 1700000000 for m in members)
    assert (tmp_path / "one.tar.gz").read_bytes()[4:8] == b"\0\0\0\0"  # gzip header mtime


def test_roundtrip_extract(tmp_path):
    pkg = make_pkg(tmp_path / "a")
    write_archive(pkg, tmp_path / "p.tar.gz", mtime=0)
    written = safe_extract(tmp_path / "p.tar.gz", tmp_path / "out")
    assert sorted(p.name for p in written) == ["manifest.json", "model.onnx"]
    assert (tmp_path / "out" / "edge" / "model.onnx").read_bytes() == b"model-bytes"


def test_extract_refuses_non_empty_dest(tmp_path):
    write_archive(make_pkg(tmp_path / "a"), tmp_path / "p.tar.gz", mtime=0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(ArchiveError, match="new or empty"):
        safe_extract(tmp_path / "p.tar.gz", tmp_path / "out")


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"evil", linkname: str = "",
            size: int | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind == tarfile.REGTYPE:
        info.size = len(data) if size is None else size
        return info, data
    return info, None


def _malicious(path: Path, bad: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    """A tar.gz with one good file first (to prove nothing is written), then the bad member."""
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        good = tarfile.TarInfo("pkg/good.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        info, data = bad
        if data is not None and info.size != len(data):
            # oversize: write a header claiming size, with that many zero bytes
            tar.addfile(info, io.BytesIO(b"\0" * info.size))
        else:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


MALICIOUS = {
    "traversal": (_member("pkg/../../evil.txt"), "'..'"),
    "absolute": (_member("/tmp/lathe-evil-abs.txt"), "absolute path"),
    "symlink": (_member("pkg/link", tarfile.SYMTYPE, linkname="../../../etc/passwd"), "symlink"),
    "hardlink": (_member("pkg/hard", tarfile.LNKTYPE, linkname="/etc/passwd"), "hardlink"),
    "device": (_member("pkg/dev", tarfile.CHRTYPE), "device file"),
    "fifo": (_member("pkg/fifo", tarfile.FIFOTYPE), "fifo"),
    "oversize": (_member("pkg/big.bin", size=4096), "oversize"),
    "duplicate": (_member("pkg/good.txt", data=b"ok"), "duplicate"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_refused_and_nothing_written(tmp_path, case):
    member, message = MALICIOUS[case]
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    archive = _malicious(archive_dir / f"{case}.tar.gz", member)
    work = tmp_path / "work"  # the fresh folder whose parent we watch
    work.mkdir()
    dest = work / "extract" / "here"
    before_tmp = sorted(p.name for p in tmp_path.iterdir())
    before_work = sorted(p.name for p in work.iterdir())
    with pytest.raises(ArchiveError, match=message):
        safe_extract(archive, dest, max_member_bytes=1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == before_tmp
    assert sorted(p.name for p in work.iterdir()) == before_work == []
    assert not dest.exists()
    assert not Path("/tmp/lathe-evil-abs.txt").exists()


def test_total_size_limit(tmp_path):
    pkg = make_pkg(tmp_path / "a")
    write_archive(pkg, tmp_path / "p.tar.gz", mtime=0)
    with pytest.raises(ArchiveError, match="total size"):
        safe_extract(tmp_path / "p.tar.gz", tmp_path / "out", max_total_bytes=5)
    assert not (tmp_path / "out").exists()


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"garbage")
    with pytest.raises(ArchiveError, match="not a readable tar"):
        safe_extract(tmp_path / "x.tar.gz", tmp_path / "out")
