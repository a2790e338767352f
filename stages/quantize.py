"""DVC stage `quantize` (foreach float variant): models/<variant> + data/prepared -> models/quantized/<variant>
(model.onnx: static INT8 QDQ, one self-contained file; quantize.json: calibration sample ids and their hash,
settings, what got quantized)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lathe.compress.params import QuantizeParams
from lathe.compress.quantize import quantize_model, write_quantized
from stages.common import parse_args, run, section

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__, argv, "model_dir", "prepared_dir", "out_dir")

    def body() -> None:
        cfg = section(args, "quantize", QuantizeParams)
        log.info("%s: calibrating %s on %d train samples (seed %d), activations %s, weights %s%s",
                 args.model_dir, cfg.method, cfg.calibration_size, cfg.seed, cfg.activation_type, cfg.weight_type,
                 ", per channel" if cfg.per_channel else "")
        result = quantize_model(args.model_dir, args.prepared_dir, cfg)
        write_quantized(args.out_dir, result)
        r = result.record
        log.info("%d B (from %s), %d Q / %d DQ nodes, %d compute nodes left float; val argmax agreement with "
                 "float %.4f, max |dlogit| %.4f; calibration ids sha256 %s -> %s", r["size_bytes"],
                 r["source"]["sha256"][:12], r["node_types"].get("QuantizeLinear", 0),
                 r["node_types"].get("DequantizeLinear", 0), len(r["float_compute_nodes"]),
                 r["check_vs_float"]["argmax_agreement"], r["check_vs_float"]["max_abs_logit_diff"],
                 r["calibration"]["sample_ids_sha256"][:12], args.out_dir)

    run("quantize", body)


if __name__ == "__main__":
    main()
