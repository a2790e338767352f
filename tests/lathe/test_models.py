import numpy as np
import onnx
import torch

from lathe.config import ArchSpec
from lathe.export import export_onnx, max_abs_diff_vs_torch
from lathe.models import build_model, count_params, final_feature_size

SPEC = ArchSpec(stem_channels=4, stem_stride=1, widths=[4, 8], blocks=[1, 1])


def test_forward_shape_and_pool_window():
    model = build_model(SPEC, 16)
    assert final_feature_size(SPEC, 16) == 8
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 4)
    assert count_params(model) > 0


def test_onnx_export_is_one_checked_file_with_dynamic_batch_and_matches_torch():
    torch.manual_seed(0)
    model = build_model(SPEC, 16).eval()
    data = export_onnx(model, 16, metadata={"lathe.test": "1"})
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert {p.key: p.value for p in proto.metadata_props}["lathe.test"] == "1"
    assert not {n.op_type for n in proto.graph.node} & {"ReduceMean", "GlobalAveragePool"}
    for batch in (1, 5):
        x = np.random.default_rng(0).random((batch, 1, 16, 16), dtype=np.float32)
        assert max_abs_diff_vs_torch(model, data, x) < 1e-4
