"""lathe.model.lite: EfficientNet-Lite on ImageNet weights, frozen and memoized layers, and the averaged networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lathe.model.lite import STRIDE_TWO, FlipAverage, LiteNet, SoftmaxAverage
from tests.lite import lite_state


def test_litenet_is_built_from_the_weights_shapes_and_keeps_every_backbone_weight():
    state = lite_state([8, 16, 16, 24])
    net = LiteNet(state, num_classes=4).eval()
    got = net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("_fc."))
    assert net._fc.out_features == 4
    kernels = [b._depthwise_conv.kernel_size[0] for b in net._blocks]
    assert kernels == [3, 5, 3, 5]
    # an identity shortcut only where the shape is kept inside a stage: block 2 (16 -> 16, stride 1). Not block 0
    # (8 -> 8 here), the first of its stage: it has none in the ImageNet network (32 -> 16), nor once pruned to equal widths
    assert [b.residual for b in net._blocks] == [False, False, True, False]
    assert [b._depthwise_conv.stride[0] for b in net._blocks] == [2 if i in STRIDE_TWO else 1 for i in range(4)]
    out = net(torch.rand(2, 1, 32, 32))  # grey in, 4 logits out
    assert out.shape == (2, 4)


def test_litenet_refuses_weights_of_another_layout():
    state = lite_state([8, 16])
    state["_blocks.1._extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        LiteNet(state, num_classes=4)


def test_litenet_frozen_blocks_keep_imagenets_weights_and_statistics_through_a_training_step():
    state = lite_state([8, 16, 16, 24])
    net = LiteNet(state, num_classes=4, frozen_blocks=2).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(torch.rand(4, 1, 32, 32)).sum().backward()
    opt.step()
    got = net.state_dict()
    frozen = ("_conv_stem.", "_bn0.", "_blocks.0.", "_blocks.1.")
    assert all(torch.equal(got[k], v) for k, v in state.items() if k.startswith(frozen))  # BN statistics too
    assert not torch.equal(got["_blocks.2._project_conv.weight"], state["_blocks.2._project_conv.weight"])
    assert not torch.equal(got["_blocks.2._bn1.running_mean"], state["_blocks.2._bn1.running_mean"])
    assert all(p.grad is None for m in net.frozen() for p in m.parameters())


def test_litenet_memoized_frozen_layers_give_the_logits_of_a_fresh_pass_and_are_used():
    net = LiteNet(lite_state([8, 16, 16, 24]), num_classes=4, frozen_blocks=2).eval()
    seen, unseen = torch.rand(6, 1, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        fresh = net(seen[:3])
        net.memoize_frozen(seen, batch_size=4)
        assert torch.allclose(net(seen[:3]), fresh, atol=1e-5)
        net._conv_stem.weight.zero_()  # a memo hit never reaches the stem again; a miss does
        assert torch.allclose(net(seen[:3]), fresh, atol=1e-5)
        # one unseen row: the whole batch goes through the (now zeroed) stem again
        assert not torch.allclose(net(torch.cat([seen[:2], unseen]))[:2], fresh[:2], atol=1e-3)
    with pytest.raises(ValueError, match="nothing is frozen"):
        LiteNet(lite_state([8, 16]), num_classes=4).memoize_frozen(seen)


def test_litenet_memoizes_with_imagenets_statistics_even_from_a_new_network_in_training_mode():
    state = lite_state([8, 16, 16, 24])
    net = LiteNet(state, num_classes=4, frozen_blocks=2)  # new modules are in training mode
    x = torch.rand(6, 1, 32, 32)
    net.memoize_frozen(x)
    assert torch.equal(net.state_dict()["_blocks.1._bn1.running_mean"], state["_blocks.1._bn1.running_mean"])
    with torch.no_grad():
        assert torch.allclose(net.frozen_output(x), net.eval().trunk(x), atol=1e-5)  # what inference computes


def test_litenet_adapts_the_frozen_statistics_to_the_inputs_and_keeps_the_weights():
    state = lite_state([8, 16, 16, 24])
    net = LiteNet(state, num_classes=4, frozen_blocks=2)
    x = torch.rand(10, 1, 32, 32) * 0.2 + 0.7  # bright cells: far from the random ImageNet-like statistics
    net.adapt_frozen_statistics(x, batch_size=5)  # equal batches: the average of batch means is the mean
    got = net.state_dict()
    with torch.no_grad():
        stem = net._conv_stem((x.expand(-1, 3, -1, -1) - 0.5) / 0.5)
    assert torch.allclose(got["_bn0.running_mean"], stem.mean(dim=(0, 2, 3)), atol=1e-4)  # cumulative: all 10 cells
    assert torch.equal(got["_blocks.1._project_conv.weight"], state["_blocks.1._project_conv.weight"])
    assert torch.equal(got["_blocks.2._bn1.running_mean"], state["_blocks.2._bn1.running_mean"])  # not frozen: untouched
    assert all(not m.training for m in net.frozen()) and net._bn0.momentum == 0.1


def test_litenet_exports_to_onnx_and_onnxruntime_gives_torchs_logits(tmp_path):
    from lathe.measure.ort import load_session, predict
    from lathe.model.export import export_onnx, save_onnx

    net = LiteNet(lite_state([8, 16, 16, 24]), num_classes=4).eval()
    save_onnx(tmp_path / "m.onnx", export_onnx(net, 32))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    got = predict(load_session(tmp_path / "m.onnx", 1), images)
    with torch.no_grad():
        want = net(torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]).numpy()
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4)  # random weights: logits up to ~5


def test_litenet_truncated_keeps_the_first_blocks_weights_and_gets_a_new_head_of_the_width_asked():
    state = lite_state([8, 16, 16, 24])
    net = LiteNet(state, num_classes=4, keep_blocks=2, head_channels=12, frozen_blocks=2).eval()
    assert len(net._blocks) == 2 and net._conv_head.weight.shape == (12, 16, 1, 1) and net._fc.in_features == 12
    got = net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if k.startswith(("_conv_stem.", "_bn0.", "_blocks.0.",
                                                                                 "_blocks.1.")))
    assert not any(k.startswith(("_blocks.2.", "_blocks.3.")) for k in got)
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="more than the 2 blocks"):
        LiteNet(state, num_classes=4, keep_blocks=2, frozen_blocks=3)
    state["_blocks.3._extra.weight"] = torch.zeros(1)  # a cut-off block's keys are skipped, whatever they hold;
    LiteNet(state, num_classes=4, keep_blocks=2)
    with pytest.raises(ValueError, match="unexpected"):  # a kept block's are not
        LiteNet(state | {"_blocks.1._extra.weight": torch.zeros(1)}, num_classes=4, keep_blocks=2)


def test_flip_average_gives_one_answer_for_a_cell_and_its_flips_and_exports(tmp_path):
    from lathe.measure.ort import load_session, predict
    from lathe.model.export import export_onnx, save_onnx

    net = LiteNet(lite_state([8, 16, 16, 24]), num_classes=4).eval()
    tta = FlipAverage(net).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        plain, averaged = net(x), tta(x)
        assert not torch.allclose(plain, net(x.flip(-1)), atol=1e-3)  # the network alone is not flip-invariant
        for flipped in (x.flip(-1), x.flip(-2), x.flip(-2, -1)):
            assert torch.allclose(tta(flipped), averaged, atol=1e-5)
    save_onnx(tmp_path / "m.onnx", export_onnx(tta, 32))
    images = (x[:, 0].numpy() * 255).round().astype(np.uint8)
    with torch.no_grad():
        want = tta(torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]).numpy()
    assert np.allclose(predict(load_session(tmp_path / "m.onnx", 1), images), want, rtol=1e-4, atol=1e-4)


def test_softmax_average_is_the_log_of_the_members_mean_distribution_and_exports(tmp_path):
    from lathe.measure.ort import load_session, predict
    from lathe.model.export import export_onnx, save_onnx

    state, members = lite_state([8, 16, 16, 24]), []
    for seed in (1, 2):
        torch.manual_seed(seed)  # the new head differs per member; the backbone is the state's
        members.append(LiteNet(state, num_classes=4).eval())
    average = SoftmaxAverage(members).eval()
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        p1, p2 = (m(x).softmax(dim=1) for m in members)
        got = average(x)
    assert not torch.allclose(p1, p2, atol=1e-3)  # two different members, or the test would show nothing
    assert torch.allclose(got.exp(), (p1 + p2) / 2, atol=1e-6)
    assert torch.allclose(got.softmax(dim=1), got.exp(), atol=1e-6)  # already normalised: a teacher's logits as they are
    save_onnx(tmp_path / "m.onnx", export_onnx(average, 32))
    images = (x[:, 0].numpy() * 255).round().astype(np.uint8)
    with torch.no_grad():
        want = average(torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]).numpy()
    assert np.allclose(predict(load_session(tmp_path / "m.onnx", 1), images), want, rtol=1e-4, atol=1e-4)
