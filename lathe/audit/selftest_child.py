"""Inside the self-test's confined child process (lathe.audit.selftest.run_selftest starts it).

Imports only numpy and onnxruntime. Loads the arrays without pickle (their headers were checked by
the parent), runs the model from bytes with one thread, compares with the expected outputs and
prints one JSON line: {"ok": bool, "message": str}.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def run(job: dict) -> dict:
    """Inside the confined child: load the arrays (no pickle), run the model, compare."""
    import onnxruntime as ort

    with np.load(job["selftest"], allow_pickle=False) as npz:
        images, expected = npz["images"], npz["logits"]
    x = images.astype(np.float32)
    if x.ndim == 3:  # (N, S, S) -> (N, 1, S, S)
        x = x[:, None]
    x = x / np.float32(job["divide_by"])
    if job["mean"] != 0.0 or job["std"] != 1.0:
        x = (x - np.float32(job["mean"])) / np.float32(job["std"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    with open(job["model"], "rb") as fh:  # from bytes: no path for external data to resolve against
        session = ort.InferenceSession(fh.read(), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: x[i: i + 16]})[0] for i in range(0, len(x), 16)])
    if got.shape != expected.shape:
        return {"ok": False, "message": f"outputs have shape {list(got.shape)}, expected {list(expected.shape)}"}
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    worst = float(diff.max()) if diff.size else 0.0
    atol = float(job["atol"])
    if not np.all(np.isfinite(got)) or worst > atol:
        bad = int((~(diff <= atol)).sum())
        return {"ok": False, "message": f"{bad} of {diff.size} outputs differ from the expected ones by more than "
                                        f"{atol:g} (max {worst:.3g}) on {len(x)} golden inputs"}
    agree = int((got.argmax(1) == expected.argmax(1)).sum())
    return {"ok": True, "message": f"{len(x)} golden inputs, max |diff| {worst:.3g} <= {atol:g}, "
                                   f"{agree}/{len(x)} classes agree (child process, 1 thread, limits applied)"}




if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
