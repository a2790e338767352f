
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lathe.config import parse_section
from lathe.errors import ConfigError
from lathe.measure.ort import count_onnx_macs
from lathe.model.arch import LowRankConv, build_model, count_macs, count_params, final_feature_size, spec_macs, spec_of
from lathe.model.export import export_onnx, max_abs_diff_vs_torch
from lathe.model.params import ArchSpec, TrainParams

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


def test_max_pool_takes_the_strongest_response_of_each_channel_and_exports_as_one_maxpool():
    """pool: max keeps a defect a few pixels wide that the average over the cell would dilute."""
    spec = SPEC.model_copy(update={"pool": "max"})
    assert spec.model_dump()["pool"] == "max" and ArchSpec.model_validate(spec.model_dump()) == spec
    torch.manual_seed(0)
    model = build_model(spec, 16).eval()
    feats = model.features(model.stem(torch.rand(2, 1, 16, 16)))
    assert torch.equal(torch.flatten(model.pool(feats), 1), feats.amax(dim=(2, 3)))
    assert not torch.equal(feats.amax(dim=(2, 3)), feats.mean(dim=(2, 3)))

    data = export_onnx(model, 16)
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert ops.count("MaxPool") == 1 and not {"ReduceMax", "GlobalMaxPool", "AveragePool"} & set(ops)
    x = np.random.default_rng(0).random((3, 1, 16, 16), dtype=np.float32)
    assert max_abs_diff_vs_torch(model, data, x) < 1e-4


def test_an_unknown_pool_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="pool"):
        parse_section({"train_teacher": {"arch": {"pool": "mean"}}}, "train_teacher", TrainParams)


# --- compressed-network specs: pruned widths, shortcut types, low-rank layers -----------------


def test_default_spec_dumps_without_the_optional_fields_so_arch_json_is_unchanged():
    dumped = ArchSpec().model_dump()
    assert not {"mid_channels", "projection", "ranks", "pool"} & set(dumped)
    assert ArchSpec.model_validate(dumped) == ArchSpec()
    full = SPEC.model_copy(update={"mid_channels": [3, 5], "projection": [False, True]}).model_dump()
    assert full["mid_channels"] == [3, 5] and full["projection"] == [False, True]


def test_mid_channels_and_projection_build_the_described_layers():
    spec = ArchSpec(stem_channels=4, stem_stride=1, widths=[4, 4], blocks=[2, 1], mid_channels=[2, 3, 1],
                    projection=[True, False, True])
    model = build_model(spec, 16)
    assert [b.conv1.out_channels for b in model.features] == [2, 3, 1]
    assert isinstance(model.features[0].shortcut, nn.Sequential)  # kept although 4 -> 4 at stride 1
    assert isinstance(model.features[1].shortcut, nn.Identity)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 4)
    assert spec_of(model) == spec


def test_spec_of_an_unpruned_network_rebuilds_the_same_layers():
    model = build_model(SPEC, 16)
    rebuilt = build_model(spec_of(model), 16)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


@pytest.mark.parametrize(("update", "message"), [
    ({"mid_channels": [4]}, "mid_channels has 1 entries but blocks"),
    ({"projection": [True, True, True]}, "projection has 3 entries"),
    ({"mid_channels": [0, 4]}, "at least 1 channel"),
    ({"projection": [False, False]}, r"projection\[1\] is false .*\(4 -> 8 channels, stride 2\)"),
    ({"ranks": {"head": 0}}, "every rank must be >= 1"),
])
def test_inconsistent_per_block_fields_are_refused_with_the_key(update, message):
    arch = {"stem_channels": 4, "stem_stride": 1, "widths": [4, 8], "blocks": [1, 1], **update}
    with pytest.raises(ConfigError, match=message):
        parse_section({"train_teacher": {"arch": arch}}, "train_teacher", TrainParams)


def test_ranks_replace_named_layers_by_factor_pairs():
    spec = SPEC.model_copy(update={"ranks": {"features.0.conv1": 2, "head": 1}})
    model = build_model(spec, 16)
    assert isinstance(model.features[0].conv1, LowRankConv)
    assert model.features[0].conv1[0].weight.shape == (2, 4, 3, 3)
    assert model.features[0].conv1[1].weight.shape == (4, 2, 1, 1)
    assert [lin.weight.shape for lin in model.head] == [(1, 8), (4, 1)] and model.head[1].bias is not None
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 4)


def test_unknown_or_oversized_ranks_name_the_layer():
    with pytest.raises(ValueError, match="no conv/linear layer named 'features.0.conv9'"):
        build_model(SPEC.model_copy(update={"ranks": {"features.0.conv9": 2}}), 16)
    with pytest.raises(ValueError, match=r"ranks\['stem.0'\] = 5 is outside 1..4"):
        build_model(SPEC.model_copy(update={"ranks": {"stem.0": 5}}), 16)


def test_torch_mac_count_matches_the_onnx_count_and_the_meta_device_count():
    spec = SPEC.model_copy(update={"mid_channels": [3, 5], "ranks": {"features.1.conv2": 2}})
    model = build_model(spec, 16).eval()
    macs = count_macs(model, 16)
    assert macs == spec_macs(spec, 16) == count_onnx_macs(onnx.load_from_string(export_onnx(model, 16)), 16)
    # stem 16*16*4*9 + conv1 16*16*3*36 + conv2 16*16*4*27 + conv1 8*8*5*36 + conv2 8*8*(2*45 + 8*2) + shortcut 8*8*8*4 + head 8*4
    assert macs == 9216 + 27648 + 27648 + 11520 + 6784 + 2048 + 32
