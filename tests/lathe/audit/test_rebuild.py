"""The rebuild's comparison helpers and its choice of the dvc.lock a package was built with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from lathe.audit.rebuild_compare import json_diff
from lathe.io import write_json
from lathe.ship.archive import write_archive
from lathe.ship.signing import sign_package
from tests.packages import build_package, make_keys, reseal, tiny_model


def test_json_diff_key_paths():
    a = {"raw_data": {"md5": "x", "files": 3}, "gates": [{"v": 1}], "k": 1}
    b = {"raw_data": {"md5": "y", "files": 3}, "gates": [{"v": 2}], "n": 2}
    assert json_diff(a, b) == ["gates[0].v", "k (only in original)", "n (only in rebuilt)", "raw_data.md5"]


def test_compare_packages_lists_files_and_manifest_keys(tmp_path):
    keys = make_keys(tmp_path / "keys")
    golden = build_package(tmp_path / "golden", keys["priv"])
    from lathe.audit.rebuild_compare import compare_archives, compare_packages

    a, b = tmp_path / "a" / "edge", tmp_path / "b" / "edge"
    shutil.copytree(golden, a)
    shutil.copytree(golden, b)
    sign_package(b, keys["priv"])  # a new (randomised) signature is not a difference
    same = compare_packages(a, b)
    assert (same.diffs, same.measured, same.follows) == ([], [], set())
    write_archive(a, tmp_path / "a.tar.gz", mtime=0)
    write_archive(b, tmp_path / "b.tar.gz", mtime=0)
    assert compare_archives(tmp_path / "a.tar.gz", tmp_path / "b.tar.gz") == []
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["variant"] = "quantized/teacher"
    write_json(b / "manifest.json", manifest)
    (b / "model_card.md").write_text("other\n")
    diffs = compare_packages(a, b).diffs
    assert diffs[0] == "the rebuild chose quantized/teacher where the package holds quantized/student"
    assert diffs[1] == "manifest.json: differs at variant"
    assert diffs[2] == "model_card.md: differs before its measured section"
    write_archive(b, tmp_path / "b.tar.gz", mtime=0)
    assert compare_archives(tmp_path / "a.tar.gz", tmp_path / "b.tar.gz") == [
        "archive member edge/manifest.json: differs (header or content)",
        "archive member edge/model_card.md: differs (header or content)"]


def test_a_rebuild_choosing_another_variant_says_why_when_the_policy_ranks_by_latency(tmp_path):
    """Policy fastest: `verify --rebuild --full` measures latency again and may rank another variant first."""
    from lathe.audit.rebuild_compare import compare_packages

    keys = make_keys(tmp_path / "keys")
    a = build_package(tmp_path / "a", keys["priv"])
    b = tmp_path / "b" / "edge"
    shutil.copytree(a, b)
    for pkg, variant in ((a, "quantized/student"), (b, "student")):
        manifest = json.loads((pkg / "manifest.json").read_text())
        manifest["target"]["selection"] = "fastest"
        manifest["variant"] = variant
        write_json(pkg / "manifest.json", manifest)

    diffs = compare_packages(a, b).diffs

    assert diffs[0] == ("the rebuild chose student where the package holds quantized/student (policy fastest ranks "
                        "by latency, and this rebuild measured it again)")
    assert diffs[1].startswith("manifest.json: differs at") and "variant" in diffs[1]


def test_measured_values_are_shown_side_by_side_and_every_other_byte_compared(tmp_path):
    """Another machine measures other latencies, so its model card's measured section differs and a
    candidate the package did not choose fails the latency gate there (as ELPV's quantized/pruned: 0.36 ms
    on an Intel Xeon, 1.07 ms on an AMD EPYC): the package id stays, the rebuild passes and shows them."""
    from lathe.audit.rebuild_compare import compare_archives, compare_packages
    from lathe.io import sha256_bytes
    from lathe.ship.contract import (
        CARD_MEASURED_HEADER,
        manifest_text,
    )

    keys = make_keys(tmp_path / "keys")
    a = build_package(tmp_path / "a", keys["priv"])
    b = tmp_path / "b" / "edge"
    shutil.copytree(a, b)
    card = (a / "model_card.md").read_text()
    for pkg, p50, student in ((a, 1.0, (0.5, True, [])), (b, 9.99, (12.5, False, ["max_latency_p50_ms"]))):
        (pkg / "model_card.md").write_text(card + f"\n{CARD_MEASURED_HEADER}\n\n- p50 latency {p50:.3f} ms\n")
        manifest = json.loads((pkg / "manifest.json").read_text())
        manifest["metrics"]["test"]["latency_p50_ms"] = p50
        row = next(r for r in manifest["selection"] if r["variant"] == "student")
        row["latency_p50_ms"], row["passed"], row["failed"] = student
        if pkg == b:
            manifest["build"]["machine"] = {"cpu": "AMD EPYC 7B13"}
        write_json(pkg / "manifest.json", manifest)
        reseal(pkg, keys["priv"])
    ids = [json.loads((pkg / "manifest.json").read_text())["package_id"] for pkg in (a, b)]
    assert ids[0] == ids[1]  # measured values are not identity

    result = compare_packages(a, b)

    assert result.diffs == []
    assert result.follows == {"manifest.json", "model.onnx", "model_card.md"}
    joined = " ".join(result.measured)
    assert "metrics.test.latency_p50_ms: " in joined and "(original) vs 9.99 (rebuilt)" in joined
    assert "AMD EPYC 7B13" in joined and "9.990 ms" in joined
    assert 'selection[2].failed: [] (original) vs ["max_latency_p50_ms"] (rebuilt)' in joined
    assert "selection[2].passed: True (original) vs False (rebuilt)" in joined
    card_a, card_b = (sha256_bytes((pkg / "model_card.md").read_bytes()) for pkg in (a, b))
    assert f"files.model_card.md: {card_a} (original) vs {card_b} (rebuilt)" in joined  # a key with a dot
    write_archive(a, tmp_path / "a.tar.gz", mtime=0)
    write_archive(b, tmp_path / "b.tar.gz", mtime=0)
    assert compare_archives(tmp_path / "a.tar.gz", tmp_path / "b.tar.gz", result.follows) == []
    # a gate verdict that is not a measurement is identity
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["selection"][2]["failed"] = ["max_latency_p50_ms", "min_accuracy"]
    (b / "manifest.json").write_text(manifest_text(manifest))
    assert compare_packages(a, b).diffs[0] == "manifest.json: differs at selection[2].failed (length 0 vs 1)"
    # the card's text above its measured section is compared byte for byte
    (b / "model_card.md").write_text("# another card\n" + (a / "model_card.md").read_text())
    assert "model_card.md: differs before its measured section" in compare_packages(a, b).diffs
    # a changed weight is still a difference, even with the stamp rewritten
    (b / "model_card.md").write_text((a / "model_card.md").read_text())
    other = build_package(tmp_path / "c", keys["priv"], seed=1) / "model.onnx"  # other weights
    (b / "model.onnx").write_bytes(other.read_bytes())
    assert any(d.startswith("model.onnx: sha256") for d in compare_packages(a, b).diffs)


def test_rebuild_picks_the_dvc_lock_the_manifest_records(tmp_path):
    """The package's commit often predates the dvc.lock it was built with: the rebuild matches the
    manifest's recorded stages against each dvc.lock candidate and names the first stage that differs."""
    from lathe.audit.rebuild import _tracked_outputs
    from lathe.ship.lineage import _lock_entry, lock_mismatch, stage_chain

    lock = {"schema": "2.0", "stages": {
        "ingest": {"cmd": "python -m stages.ingest data/raw data/prepared",
                   "deps": [{"path": "data/raw", "hash": "md5", "md5": "r" * 32 + ".dir", "nfiles": 3}],
                   "params": {"params.yaml": {"ingest": {"seed": 0}}},
                   "outs": [{"path": "data/prepared", "hash": "md5", "md5": "p" * 32 + ".dir", "size": 9}]},
        "evaluate@x": {"cmd": "python -m stages.evaluate x",
                       "deps": [{"path": "data/prepared", "md5": "p" * 32 + ".dir"}],
                       "outs": [{"path": "reports/x/metrics.json", "md5": "m" * 32}]}}}
    _, entries, _ = stage_chain(lock, ["reports/x/metrics.json"])
    manifest = json.loads(json.dumps({"stages": entries}))  # as read back from manifest.json
    assert lock_mismatch(lock, manifest["stages"]) is None
    rerun = json.loads(json.dumps(lock))
    rerun["stages"]["ingest"]["outs"][0]["md5"] = "q" * 32 + ".dir"
    assert lock_mismatch(rerun, manifest["stages"]) == "its stage ingest differs"
    del rerun["stages"]["evaluate@x"]
    assert lock_mismatch(rerun, manifest["stages"]) == "it has no stage evaluate@x"
    assert _lock_entry(lock["stages"]["ingest"])["outs"] == [{"path": "data/prepared", "md5": "p" * 32 + ".dir"}]

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw.dvc").write_text("outs:\n- md5: " + "r" * 32 + ".dir\n  path: raw\n")
    assert _tracked_outputs(tmp_path, lock) == {"data/raw": "r" * 32 + ".dir", "data/prepared": "p" * 32 + ".dir",
                                                "reports/x/metrics.json": "m" * 32}


def test_equivalence_on_a_machine_without_the_pins_needs_selftest_within_atol_and_equal_metrics(tmp_path):
    import numpy as np

    from lathe.audit.rebuild_compare import equivalence
    from lathe.ship.contract import npz_bytes

    keys = make_keys(tmp_path / "keys")
    a = build_package(tmp_path / "a", keys["priv"])
    b = tmp_path / "b" / "edge"

    def rebuilt_with(shift: float, accuracy: float = 0.5) -> Path:
        shutil.rmtree(b, ignore_errors=True)
        shutil.copytree(a, b)
        with np.load(a / "selftest.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["logits"] = (arrays["logits"] + shift).astype(np.float32)
        (b / "selftest.npz").write_bytes(npz_bytes(arrays))
        manifest = json.loads((b / "manifest.json").read_text())
        manifest["metrics"]["test"]["accuracy"] = accuracy
        write_json(b / "manifest.json", manifest)
        return b

    assert "within" in equivalence(a, rebuilt_with(1e-5))
    assert equivalence(a, rebuilt_with(0.5)) is None  # beyond the package's atol (1e-3)
    assert equivalence(a, rebuilt_with(0.0, accuracy=0.51)) is None  # another test accuracy


def test_a_float_model_rebuilt_on_another_instruction_set_is_equivalent_an_int8_one_must_be_identical(tmp_path):
    """Same model bytes, self-test logits 1e-6 apart (onnxruntime's float kernels, AVX-512 vs AVX2): a float
    package is EQUIVALENT, NOT IDENTICAL on a machine with the pins; an INT8 package must be identical."""
    import numpy as np

    from lathe.audit.rebuild_report import report_rebuild
    from lathe.audit.report import VerifyReport
    from lathe.audit.trust import resolve_trust
    from lathe.ship.contract import npz_bytes

    keys = make_keys(tmp_path / "keys")
    trust = resolve_trust(None, keys["pub"])

    def pair(calibration: dict | None, shift: float, name: str, model=None) -> tuple[Path, Path]:
        a = build_package(tmp_path / name / "a", keys["priv"], model=model)
        b = tmp_path / name / "b" / "edge"
        shutil.copytree(a, b)
        for pkg, delta in ((a, 0.0), (b, shift)):
            with np.load(pkg / "selftest.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            arrays["logits"] = (arrays["logits"] + delta).astype(np.float32)
            (pkg / "selftest.npz").write_bytes(npz_bytes(arrays))
            manifest = json.loads((pkg / "manifest.json").read_text())
            manifest["calibration"] = calibration
            write_json(pkg / "manifest.json", manifest)
            reseal(pkg, keys["priv"])
        return a, b

    def verdict(a: Path, b: Path) -> tuple[str, str]:
        report = VerifyReport(str(a))
        report_rebuild(a, None, b, tmp_path / "none.tar.gz", "c" * 40, "only package@edge", True, trust, report)
        check = next(c for c in report.checks if c.name == "rebuild")
        return check.status, check.message

    status, message = verdict(*pair(None, 1e-6, "float"))
    assert status == "PASS" and message.startswith("EQUIVALENT, NOT IDENTICAL") and "a float model" in message
    assert "selftest.npz" in message
    status, message = verdict(*pair({"method": "minmax", "size": 8}, 1e-6, "int8"))
    assert status == "FAIL" and "selftest.npz" in message
    status, _ = verdict(*pair(None, 0.5, "float-far"))  # beyond the package's atol: not equivalent
    assert status == "FAIL"
    # a quantization-aware model records no calibration, but its graph is INT8: it must be identical too
    status, message = verdict(*pair(None, 1e-6, "qat", model=with_quantized_input(tiny_model(0))))
    assert status == "FAIL" and "selftest.npz" in message


def with_quantized_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` reading its input through a uint8 QuantizeLinear/DequantizeLinear pair: an INT8 graph."""
    from onnx import TensorProto, helper

    graph = model.graph
    name = graph.input[0].name
    for node in graph.node:
        node.input[:] = [f"{name}_dq" if i == name else i for i in node.input]
    graph.initializer.extend([helper.make_tensor("in_scale", TensorProto.FLOAT, [], [1 / 255]),
                              helper.make_tensor("in_zero", TensorProto.UINT8, [], [0])])
    qdq = [helper.make_node("QuantizeLinear", [name, "in_scale", "in_zero"], [f"{name}_q"]),
           helper.make_node("DequantizeLinear", [f"{name}_q", "in_scale", "in_zero"], [f"{name}_dq"])]
    nodes = [*qdq, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def test_a_rebuild_elsewhere_is_signed_by_the_rebuilding_key_and_checked_against_it(tmp_path):
    """The builder's key (trusted) signed the package; an auditor's machine rebuilds and signs with its own
    key. The rebuilt signature is checked against the key the rebuild used, not the verify's trust anchors
    (which would fail every rebuild off the build machine), and the package's own signer stays the report's
    fact. A rebuilt package altered after signing, or signed by a third key, still fails."""
    from lathe.audit.rebuild_report import report_rebuild
    from lathe.audit.report import VerifyReport
    from lathe.audit.trust import rebuild_key_trust, resolve_trust
    from lathe.ship.signing import key_fingerprint

    builder, auditor, other = (make_keys(tmp_path / "keys", n) for n in ("builder", "auditor", "other"))
    trust = resolve_trust(None, builder["pub"])
    a = build_package(tmp_path / "a", builder["priv"])

    def rebuilt_signature(signing_key: Path, signed_with: Path, name: str, tamper: bool = False) -> tuple[str, str]:
        b = tmp_path / name / "edge"
        shutil.copytree(a, b)
        sign_package(b, signed_with)
        if tamper:
            (b / "model_card.md").write_text((b / "model_card.md").read_text() + "altered\n")
        report = VerifyReport(str(a))
        report.facts["signed by"] = "the builder"
        folder = tmp_path / name / "keys"
        folder.mkdir()
        report_rebuild(a, None, b, tmp_path / "none.tar.gz", "c" * 40, "every stage", True,
                       rebuild_key_trust(signing_key, folder, trust), report)
        assert report.facts["signed by"] == "the builder"
        check = next(c for c in report.checks if c.name == "rebuilt signature")
        return check.status, check.message

    status, message = rebuilt_signature(auditor["priv"], auditor["priv"], "elsewhere")
    assert status == "PASS", message
    assert f"sha256:{key_fingerprint(auditor['pub'])[:16]}" in message
    assert "not one of this verify's trusted keys" in message
    assert "its public half, derived here" in message and "rebuild-signing-key.pub" not in message  # no scratch path
    status, message = rebuilt_signature(builder["priv"], builder["priv"], "at-home")
    assert status == "PASS" and "also a trusted key of this verify" in message
    status, message = rebuilt_signature(auditor["priv"], auditor["priv"], "altered", tamper=True)
    assert status == "FAIL" and f"sha256:{key_fingerprint(auditor['pub'])[:16]}" in message
    status, message = rebuilt_signature(auditor["priv"], other["priv"], "third-key")
    assert status == "FAIL" and "not trusted" in message
    status, message = rebuilt_signature(auditor["pub"], auditor["priv"], "not-a-private-key")
    assert status == "SKIP" and str(auditor["pub"]) in message and "not an unencrypted PEM private key" in message
