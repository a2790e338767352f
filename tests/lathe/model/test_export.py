from pathlib import Path

import onnx

import lathe
from lathe.model.arch import build_model
from lathe.model.export import SOURCE_METADATA_KEYS, export_onnx
from lathe.model.params import ArchSpec


def test_exported_onnx_holds_no_source_paths_so_other_checkouts_rebuild_the_same_bytes():
    model = build_model(ArchSpec(stem_channels=4, stem_stride=1, widths=[4, 8], blocks=[1, 1]), 16)

    data = export_onnx(model, 16)

    proto = onnx.load_from_string(data)
    keys = {m.key for n in proto.graph.node for m in n.metadata_props}
    assert not keys & SOURCE_METADATA_KEYS
    assert "pkg.torch.onnx.name_scopes" in keys  # layer names stay: they belong to the model
    assert str(Path(lathe.__file__).parent).encode() not in data
    assert b"arch.py" not in data


def test_exported_onnx_does_not_name_the_python_module_of_its_classes_so_moving_code_keeps_the_bytes():
    model = build_model(ArchSpec(stem_channels=4, stem_stride=1, widths=[4, 8], blocks=[1, 1]), 16)

    data = export_onnx(model, 16)

    assert b"lathe.model" not in data and b"BasicBlock" not in data
