import copy
import subprocess
import sys

import yaml
from safetensors.torch import load_file

from lathe.model.teacher import FILES
from tests.tiny import TINY_PARAMS, make_prepared


def test_the_stage_trains_members_in_parallel_processes_with_progress_and_time_left(tmp_path):
    """The real entry point (`python -m stages.train_teacher`, as DVC runs it): members in two child
    processes, progress of every epoch with the time left; the same weights as one after another."""
    make_prepared(tmp_path)
    outs = {}
    for parallel in (2, 1):
        params = copy.deepcopy(TINY_PARAMS)
        params["train_teacher"]["ensemble"] = {"members": 2, "parallel": parallel}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        out = tmp_path / f"teacher{parallel}"
        proc = subprocess.run([sys.executable, "-m", "stages.train_teacher", str(tmp_path / "prepared"), str(out),
                               str(tmp_path / f"hist{parallel}.csv"), "--params", str(tmp_path / "params.yaml")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        epochs = TINY_PARAMS["train_teacher"]["epochs"]
        for who in ("member 1/2", "member 2/2", "distilled"):
            assert sum(who in line and "left)" in line for line in proc.stderr.splitlines()) == epochs, proc.stderr
        outs[parallel] = load_file(out / FILES.weights)
    assert outs[1].keys() == outs[2].keys()
    assert all((outs[1][k] == outs[2][k]).all() for k in outs[1])
