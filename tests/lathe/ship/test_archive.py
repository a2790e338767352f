"""Deterministic package archives, and an extractor that takes only the package layout, streams under
byte, member and time limits, and leaves nothing behind when it refuses."""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from lathe.ship.archive import ArchiveError, Limits, extract_package, write_archive


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
    write_archive(make_pkg(tmp_path / "a"), tmp_path / "p.tar.gz", mtime=0)
    pkg = extract_package(tmp_path / "p.tar.gz", tmp_path / "out")
    assert pkg == tmp_path / "out" / "edge"
    assert sorted(p.name for p in pkg.iterdir()) == ["manifest.json", "model.onnx"]
    assert (pkg / "model.onnx").read_bytes() == b"model-bytes"


def test_extract_refuses_non_empty_dest(tmp_path):
    write_archive(make_pkg(tmp_path / "a"), tmp_path / "p.tar.gz", mtime=0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(ArchiveError, match="new or empty"):
        extract_package(tmp_path / "p.tar.gz", tmp_path / "out")


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"evil", linkname: str = "",
            size: int | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind == tarfile.REGTYPE:
        info.size = len(data) if size is None else size
        return info, data
    return info, None


def _malicious(path: Path, *bad: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.GNU_FORMAT) -> Path:
    """A tar.gz with one good file first (to prove nothing is left), then the bad member(s)."""
    with tarfile.open(path, "w:gz", format=fmt) as tar:
        good = tarfile.TarInfo("edge/good.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        for info, data in bad:
            if data is not None and info.size != len(data):
                tar.addfile(info, io.BytesIO(b"\0" * info.size))  # oversize: that many zero bytes
            else:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


MALICIOUS = {
    "traversal": ([_member("edge/../../evil.txt")], "not <target>/<file>"),
    "absolute": ([_member("/tmp/lathe-evil-abs.txt")], "not <target>/<file>"),
    "symlink": ([_member("edge/link", tarfile.SYMTYPE, linkname="../../../etc/passwd")], "a symlink"),
    "hardlink": ([_member("edge/hard", tarfile.LNKTYPE, linkname="/etc/passwd")], "a hardlink"),
    "device": ([_member("edge/dev", tarfile.CHRTYPE)], "a device file"),
    "fifo": ([_member("edge/fifo", tarfile.FIFOTYPE)], "a fifo"),
    "oversize": ([_member("edge/big.bin", size=4096)], "4096 bytes > limit 1024"),
    "duplicate": ([_member("edge/good.txt", data=b"ok")], "duplicate member"),
    "very long name": ([_member("edge/" + "a" * 5000)], "not <target>/<file>"),
    "file and folder of one name": ([_member("edge/x"), _member("edge/x/y")], "not <target>/<file>"),
    "nested folder": ([_member("edge/sub", tarfile.DIRTYPE)], "a nested folder"),
    "second top folder": ([_member("other/model.onnx")], "a second top-level folder"),
    "control characters": ([_member("edge/\x1b[31mred")], "edge/\\x1b[31mred"),
    "bad top name": ([_member("Edge Pkg/x")], "not <target>/<file>"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_refused_and_nothing_left(tmp_path, case):
    members, message = MALICIOUS[case]
    archive = _malicious(tmp_path / "bad.tar.gz", *members)
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "extract" / "here"
    with pytest.raises(ArchiveError, match=message.replace("[", r"\[").replace("\\x", "\\\\x")) as err:
        extract_package(archive, dest, Limits(member_bytes=1024))
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)
    assert not dest.exists() and not (work / "extract").exists() or list(work.rglob("*")) == [work / "extract"]
    assert not Path("/tmp/lathe-evil-abs.txt").exists()


def test_too_many_members_and_total_size(tmp_path):
    pkg = make_pkg(tmp_path / "a")
    write_archive(pkg, tmp_path / "p.tar.gz", mtime=0)
    with pytest.raises(ArchiveError, match="more than 5 bytes"):
        extract_package(tmp_path / "p.tar.gz", tmp_path / "out", Limits(total_bytes=5))
    with pytest.raises(ArchiveError, match="more than 1 members"):
        extract_package(tmp_path / "p.tar.gz", tmp_path / "out", Limits(members=1))
    assert not (tmp_path / "out").exists()


def _gzip_bomb(path: Path, gib: float = 1.0) -> Path:
    """A valid .tar.gz whose one member claims and holds `gib` GiB of zeros (about 1 MB compressed)."""
    size = int(gib * 2**30)
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as gz:
        info = tarfile.TarInfo("edge/model.onnx")
        info.size = size
        gz.write(info.tobuf(format=tarfile.GNU_FORMAT))
        zeros = b"\0" * (1 << 22)
        for _ in range(size // len(zeros)):
            gz.write(zeros)
    return path


def test_a_decompression_bomb_is_refused_at_its_header_before_writing(tmp_path):
    bomb = _gzip_bomb(tmp_path / "edge.tar.gz", 1.0)
    start = time.monotonic()
    with pytest.raises(ArchiveError, match="member edge/model.onnx: 1073741824 bytes > limit"):
        extract_package(bomb, tmp_path / "out")
    assert time.monotonic() - start < 5 and not (tmp_path / "out").exists()


def test_a_bomb_hidden_in_a_pax_header_stops_at_the_stream_limit(tmp_path):
    """tarfile reads a PAX header into memory whole; the counted stream stops it at the limit."""
    raw = io.BytesIO()
    info = tarfile.TarInfo("edge/model.onnx")
    info.pax_headers = {"comment": "x" * (8 * 2**20)}
    info.size = 1
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"m"))
    (tmp_path / "edge.tar.gz").write_bytes(gzip.compress(raw.getvalue()))
    with pytest.raises(ArchiveError, match="decompresses to more than"):
        extract_package(tmp_path / "edge.tar.gz", tmp_path / "out", Limits(total_bytes=2**20, members=4))


def test_a_full_disk_while_extracting_is_one_line(tmp_path):
    """The file-size limit makes the write fail as a full disk would (EFBIG instead of ENOSPC)."""
    write_archive(make_pkg(tmp_path / "a"), tmp_path / "p.tar.gz", mtime=0)
    code = ("import resource, signal, sys; from pathlib import Path; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4, 4));"
            "from lathe.ship.archive import extract_package, ArchiveError\n"
            "try: extract_package(Path(sys.argv[1]), Path(sys.argv[2]))\n"
            "except ArchiveError as e: print('REFUSED', e)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.tar.gz"), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stdout.startswith("REFUSED") and "cannot write member edge/" in res.stdout
    assert "File too large" in res.stdout and not (tmp_path / "out").exists()


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"garbage")
    with pytest.raises(ArchiveError, match="not a readable tar.gz archive"):
        extract_package(tmp_path / "x.tar.gz", tmp_path / "out")
    (tmp_path / "y.tar.gz").write_bytes(gzip.compress(b"not a tar") [:-5])
    with pytest.raises(ArchiveError, match="not a readable tar.gz archive"):
        extract_package(tmp_path / "y.tar.gz", tmp_path / "out")


def _pax_bomb(path: Path, mib: int = 300) -> Path:
    raw = io.BytesIO()
    info = tarfile.TarInfo("edge/model.onnx")
    info.pax_headers = {"comment": "x" * (mib * 2**20)}
    info.size = 1
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"m"))
    path.write_bytes(gzip.compress(raw.getvalue(), compresslevel=1))
    return path


@pytest.mark.parametrize("kind", ["member bomb", "pax header bomb"])
def test_the_installed_cli_refuses_bombs_within_30_s_and_512_mb(tmp_path, kind):
    """As a user runs it: `lathe verify <bomb>.tar.gz`, default limits, time and peak memory of the process."""
    bomb = _gzip_bomb(tmp_path / "edge.tar.gz", 1.0) if kind == "member bomb" else _pax_bomb(tmp_path / "edge.tar.gz")
    lathe = Path(sys.executable).parent / "lathe"
    code = ("import resource, subprocess, sys, time; t = time.monotonic();"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
            "print(r.returncode, round(time.monotonic() - t, 2), "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); print(r.stdout + r.stderr)")
    res = subprocess.run([sys.executable, "-c", code, str(lathe), "verify", str(bomb), "--public-key", "/nonexistent"],
                         capture_output=True, text=True, cwd=tmp_path)
    status, seconds, peak_mb = res.stdout.split("\n")[0].split()
    assert status == "1" and float(seconds) < 30 and int(peak_mb) < 512, res.stdout
    assert "archive" in res.stdout and "FAIL" in res.stdout and "Traceback" not in res.stdout
    assert ("1073741824 bytes > limit" if kind == "member bomb" else "decompresses to more than") in res.stdout
