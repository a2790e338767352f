from pathlib import Path

import onnx

import lathe
from lathe.config import ArchSpec
from lathe.model.export import STACK_TRACE_KEY, export_onnx
from lathe.model.arch import build_model


def test_exported_onnx_holds_no_source_paths_so_other_checkouts_rebuild_the_same_bytes():
    model = build_model(ArchSpec(stem_channels=4, stem_stride=1, widths=[4, 8], blocks=[1, 1]), 16)

    data = export_onnx(model, 16)

    proto = onnx.load_from_string(data)
    keys = {m.key for n in proto.graph.node for m in n.metadata_props}
    assert STACK_TRACE_KEY not in keys
    assert str(Path(lathe.__file__).parent).encode() not in data
    assert b"models.py" not in data
