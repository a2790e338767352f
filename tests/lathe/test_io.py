import numpy as np
import pytest

from lathe.io import atomic_path, load_arrays, read_json, save_arrays, sha256_file, write_json


def test_atomic_write_leaves_old_file_and_no_temp_on_error(tmp_path):
    dest = tmp_path / "out.json"
    write_json(dest, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert read_json(dest) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_json_is_byte_stable(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, 2]})
    write_json(tmp_path / "b.json", {"a": [1.5, 2], "b": 1})
    assert sha256_file(tmp_path / "a.json") == sha256_file(tmp_path / "b.json")


def test_arrays_round_trip(tmp_path):
    arrays = {"x": np.arange(12, dtype=np.uint8).reshape(3, 4), "y": np.array([1, 2], dtype=np.int64)}
    save_arrays(tmp_path / "a.safetensors", arrays, {"k": "v"})
    back = load_arrays(tmp_path / "a.safetensors")
    assert set(back) == {"x", "y"}
    np.testing.assert_array_equal(back["x"], arrays["x"])
