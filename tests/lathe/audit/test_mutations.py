"""Mutation sweep: at least 500 seeded mutations of a signed package, folder and archive; `lathe verify` never
exits 0 and never prints a traceback, and `lathe trace` never says VERIFIED, for any of them.

Mutations: byte flips, insertions and truncations in every file; files added (plain and oddly named),
removed, renamed, duplicated, swapped with another genuine package's, replaced by links or folders;
signatures swapped from another package or made by an untrusted key; a manifest edited and the model
re-stamped to match; and at the archive level byte flips, truncations, and members added, removed,
renamed, duplicated or oddly named. Shipped archives keep their original `.sha256` beside them.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
import time
from collections import Counter

import pytest
from typer.testing import CliRunner

from lathe.cli import app
from lathe.io import sha256_file, write_json
from lathe.ship.archive import archive_bytes, write_archive
from lathe.ship.contract import PACKAGE_FILES, stamp_model_bytes, unstamped_model_bytes
from tests.packages import build_package, make_keys, reseal

N_MUTATIONS = int(__import__("os").environ.get("LATHE_MUTATIONS", "520"))
ODD_NAMES = ["\x1b[31mred", "a" * 300, "..", "model.onnx/", " space", "caf\u00e9", "[bold]x[/]", "nul\x00x",
             "new\nline", ".hidden", "signature.bak", "manifest.json ", "MODEL.ONNX"]
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mutations")
    keys = make_keys(root / "keys")
    attacker = make_keys(root / "attacker")
    golden = build_package(root / "golden", keys["priv"])
    other = build_package(root / "other", keys["priv"], seed=7)  # another genuine package, same target
    return {"root": root, "keys": keys, "attacker": attacker, "golden": golden, "other": other}


# --- folder mutations: each takes (rng, package folder, world) and edits the folder in place


def flip(rng, pkg, w):
    f = pkg / rng.choice(PACKAGE_FILES)
    data = bytearray(f.read_bytes())
    i = rng.randrange(len(data))
    data[i] ^= rng.randrange(1, 256)
    f.write_bytes(bytes(data))


def insert(rng, pkg, w):
    f = pkg / rng.choice(PACKAGE_FILES)
    data = f.read_bytes()
    i = rng.randrange(len(data) + 1)
    f.write_bytes(data[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9))) + data[i:])


def truncate(rng, pkg, w):
    f = pkg / rng.choice(PACKAGE_FILES)
    data = f.read_bytes()
    f.write_bytes(data[:rng.randrange(len(data))])


def add(rng, pkg, w):
    name = rng.choice(ODD_NAMES + ["extra.bin", "notes.txt"]).replace("\x00", "").replace("/", "")
    if name in ("..", "") or len(name) > 255:
        name = "x" * 200
    (pkg / name).write_bytes(b"extra")


def remove(rng, pkg, w):
    (pkg / rng.choice(PACKAGE_FILES)).unlink()


def rename(rng, pkg, w):
    a = rng.choice(PACKAGE_FILES)
    b = rng.choice([n for n in PACKAGE_FILES if n != a] + ["renamed.bin"])
    tmp = pkg / ".swap"
    (pkg / a).rename(tmp)
    if (pkg / b).exists():
        (pkg / b).rename(pkg / a)
    tmp.rename(pkg / b)


def duplicate(rng, pkg, w):
    a = rng.choice(PACKAGE_FILES)
    shutil.copy2(pkg / a, pkg / f"{a}.copy")


def swap_from_other(rng, pkg, w):
    name = rng.choice([n for n in PACKAGE_FILES if (w["other"] / n).read_bytes() != (pkg / n).read_bytes()])
    shutil.copy2(w["other"] / name, pkg / name)


def link_or_folder(rng, pkg, w):
    name = rng.choice(PACKAGE_FILES)
    (pkg / name).unlink()
    if rng.random() < 0.5:
        (pkg / name).symlink_to(w["golden"] / name)
    else:
        (pkg / name).mkdir()


def untrusted_signer(rng, pkg, w):
    """Edit something, then make everything consistent with the attacker's key: only the signer is wrong."""
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["validation"]["summary"] = f"edited {rng.random()}"
    write_json(pkg / "manifest.json", manifest)
    reseal(pkg, w["attacker"]["priv"])


def restamp(rng, pkg, w):
    """Edit the manifest and re-stamp the model with its new hash (no key: the signature is the old one)."""
    manifest = json.loads((pkg / "manifest.json").read_text())
    key = rng.choice(["raw_data", "validation", "git", "gates", "params"])
    manifest[key] = {"edited": rng.random()} if key != "gates" else []
    write_json(pkg / "manifest.json", manifest)
    model = unstamped_model_bytes((pkg / "model.onnx").read_bytes())
    pid = manifest["package_id"] if rng.random() < 0.5 else "f" * 16
    (pkg / "model.onnx").write_bytes(stamp_model_bytes(model, pid, sha256_file(pkg / "manifest.json")))


def swap_signature(rng, pkg, w):
    shutil.copy2(w["other"] / "signature", pkg / "signature")


FOLDER_MUTATIONS = [flip, insert, truncate, add, remove, rename, duplicate, swap_from_other, link_or_folder,
                    untrusted_signer, restamp, swap_signature]


# --- archive mutations: each takes (rng, tar bytes, gzip bytes) and returns new .tar.gz bytes


def _tar_members(tar_bytes: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _retar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    import gzip

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def a_flip(rng, tar_bytes, gz):
    data = bytearray(gz)
    data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    return bytes(data)


def a_truncate(rng, tar_bytes, gz):
    return gz[:rng.randrange(len(gz))]


def a_member(rng, tar_bytes, gz):
    members = _tar_members(tar_bytes)
    op = rng.choice(["add", "remove", "rename", "duplicate", "top"])
    if op == "add":
        info = tarfile.TarInfo("edge/" + rng.choice(ODD_NAMES + ["../../evil", "/abs"]))
        members.insert(rng.randrange(len(members) + 1), (info, b"evil"))
    elif op == "remove":
        members.pop(rng.randrange(len(members)))
    elif op == "rename":
        i = rng.randrange(len(members))
        members[i][0].name = rng.choice([n for n in ("edge/renamed", "edge/model.onnx", "edge/manifest.json", "edge/x/y")
                                         if n != members[i][0].name])
    elif op == "duplicate":
        i = rng.randrange(len(members))
        members.insert(i, (tarfile.TarInfo(members[i][0].name), members[i][1]))
    else:
        for info, _ in members:
            info.name = info.name.replace("edge/", rng.choice(["line-pc/", "edge/sub/", "/", "e\x1bdge/"]), 1)
    return _retar(members)


ARCHIVE_MUTATIONS = [a_flip, a_truncate, a_member]


def test_500_seeded_mutations_never_verify_and_never_trace_as_verified(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside any repository: trace verifies the package, no history cross-check
    start = time.monotonic()
    pub = str(world["keys"]["pub"])
    tar_bytes = _untar(archive_bytes(world["golden"], 0))
    gz = archive_bytes(world["golden"], 0)
    kinds, slow = Counter(), []
    for seed in range(N_MUTATIONS):
        rng = random.Random(seed)
        case = tmp_path / f"m{seed}"
        if seed % 4 == 3:  # an archive, shipped with the original's .sha256 beside it
            mutate = rng.choice(ARCHIVE_MUTATIONS)
            case.mkdir()
            subject = case / "edge.tar.gz"
            data = mutate(rng, tar_bytes, gz)
            subject.write_bytes(data)
            (case / "edge.tar.gz.sha256").write_text(f"{sha256_of(gz)}  edge.tar.gz\n")
        else:
            mutate = rng.choice(FOLDER_MUTATIONS)
            subject = case / "edge"
            shutil.copytree(world["golden"], subject)
            mutate(rng, subject, world)
            if seed % 4 == 2 and mutate is not link_or_folder:  # shipped as a fresh archive (no sidecar)
                write_archive(subject, case / "edge.tar.gz", mtime=0)
                (case / "edge.tar.gz.sha256").unlink()
                shutil.rmtree(subject)
                subject = case / "edge.tar.gz"
        kinds[mutate.__name__] += 1
        t0 = time.monotonic()
        res = runner.invoke(app, ["verify", str(subject), "--public-key", pub])
        assert res.exit_code != 0, f"seed {seed} ({mutate.__name__}) verified:\n{res.output}"
        assert "Traceback" not in res.output, f"seed {seed} ({mutate.__name__}):\n{res.output}"
        res = runner.invoke(app, ["trace", str(subject), "--public-key", pub, "--json"])
        assert "Traceback" not in res.output, f"seed {seed} ({mutate.__name__}):\n{res.output}"
        if res.exit_code == 0:
            verdict = json.loads(res.output)["verdict"]
            assert verdict != "VERIFIED", f"seed {seed} ({mutate.__name__}) traced as VERIFIED"
        slow.append((time.monotonic() - t0, seed))
        shutil.rmtree(case)
    elapsed = time.monotonic() - start
    assert sum(kinds.values()) >= 500 and len(kinds) == len(FOLDER_MUTATIONS) + len(ARCHIVE_MUTATIONS), kinds
    print(f"\n{sum(kinds.values())} mutations in {elapsed:.1f} s (verify + trace each); slowest "
          f"{max(slow)[0]:.2f} s (seed {max(slow)[1]}); by kind: {dict(sorted(kinds.items()))}")
    assert elapsed < 240  # verify alone must stay under 2 minutes; both together here


def _untar(gz: bytes) -> bytes:
    import gzip

    return gzip.decompress(gz)


def sha256_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
