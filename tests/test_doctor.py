"""`regioncl doctor` reports this machine as it is (CI runs it through this test)."""

import importlib.util
import shutil

import torch

from regioncl.cli import main


def test_doctor_reports_torch_gpus_detectron2_and_slurm_as_this_machine_has_them(capsys):
    main(["doctor"])
    out = capsys.readouterr().out
    print(out)  # the report in CI's log
    lines = {line.split(":", 1)[0].strip(): line for line in out.splitlines() if ":" in line}
    assert torch.__version__ in lines["ok  torch"]
    if torch.cuda.is_available():
        assert lines["ok  GPUs"].startswith(f"ok  GPUs: {torch.cuda.device_count()} x ")
    else:
        assert lines["--  GPUs"].startswith("--  GPUs: none")
    has_detectron2 = importlib.util.find_spec("detectron2") is not None
    assert ("--  detectron2: not installed" in out) == (not has_detectron2)
    if not has_detectron2:
        assert "pip install --no-build-isolation" in lines["--  detectron2"]
    assert ("--  SLURM: sbatch not on PATH" in out) == (shutil.which("sbatch") is None)
    verdict = "yes" if has_detectron2 and "ok  detectron2" in out else "no"
    assert f"  detectron2 benchmarks: {verdict}" in out
    assert "  the CPU default (config/config.yaml): yes" in out
