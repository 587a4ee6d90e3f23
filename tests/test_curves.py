"""Training curves (regioncl/curves.py) and progress lines (regioncl/progress.py)."""

import io
import json
import math

import pytest

from regioncl.curves import MetricsLog, plot_curves, publish_detectron2_metrics, read_metrics
from regioncl.methods.moco_v2 import MocoV2, MocoV2Params
from regioncl.progress import Progress


def test_a_resumed_log_drops_the_steps_it_will_redo_and_publishes_the_rest(tmp_path):
    log = MetricsLog(tmp_path / "work/metrics.jsonl", resume_step=0)
    for step in range(1, 6):
        log.append({"step": step, "lr": 0.1, "loss": 10.0 - step})
    resumed = MetricsLog(tmp_path / "work/metrics.jsonl", resume_step=3)  # the checkpoint was at step 3
    resumed.append({"step": 4, "lr": 0.1, "loss": 0.5})
    resumed.publish(tmp_path / "results/metrics/run.jsonl")
    records = read_metrics(tmp_path / "results/metrics/run.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 0.5)]


def test_detectron2_metrics_become_step_records_keeping_a_resumes_last_word(tmp_path):
    source = tmp_path / "metrics.json"
    lines = [
        {"iteration": 19, "total_loss": 3.0, "lr": 0.01, "loss_cls": 2.0, "data_time": 0.1},
        {"iteration": 39, "total_loss": 2.5, "lr": 0.02, "loss_cls": 1.5},
        {"iteration": 39, "total_loss": 2.4, "lr": 0.02, "loss_cls": 1.4},  # after a resume
        {"iteration": 40, "bbox/AP": 1.0},  # an evaluation record: no loss
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert publish_detectron2_metrics(source, tmp_path / "out.jsonl") == 2
    assert read_metrics(tmp_path / "out.jsonl") == [
        {"step": 20, "lr": 0.01, "loss": 3.0, "loss_cls": 2.0},
        {"step": 40, "lr": 0.02, "loss": 2.4, "loss_cls": 1.4},
    ]


def test_moco_v2_chance_loss_is_infonce_over_the_queue_and_the_positive():
    method = MocoV2(MocoV2Params(queue_size=256, crop_size=32, hidden_dim=32, feature_dim=16), arch="resnet18")
    assert method.chance_loss() == pytest.approx(math.log(257))


def test_plot_draws_each_log_with_its_chance_level(tmp_path):
    logs = {}
    for name, chance in (("moco", math.log(257)), ("byol", None)):
        path = tmp_path / f"{name}.jsonl"
        records = [{"step": s, "lr": 0.03, "loss": 6.0 - s / 100, **({"chance_loss": chance} if chance else {})} for s in range(1, 101)]
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        logs[name] = path
    drawn = plot_curves(logs, tmp_path / "plots/curves.svg", "pretraining")
    assert "<svg" in (tmp_path / "plots/curves.svg").read_text()
    assert drawn["moco"]["chance_loss"] == pytest.approx(math.log(257)) and drawn["byol"]["chance_loss"] is None
    assert drawn["moco"]["steps"] == 100 and drawn["moco"]["final_loss"] == pytest.approx(5.01, abs=0.02)


def test_progress_off_a_terminal_prints_short_periodic_lines():
    stream = io.StringIO()
    progress = Progress(100, desc="pretrain moco_v2", every=25, stream=stream)
    for step in range(1, 101):
        progress.update(step, loss=5.5 - step / 100, lr=0.03)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"pretrain moco_v2: {n}/100" for n in (25, 50, 75, 100)]
    assert "loss=4.5 lr=0.03" in lines[-1] and "\r" not in stream.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_bar():
    stream = Terminal()
    progress = Progress(10, desc="finetune", stream=stream)
    for step in range(1, 11):
        progress.update(step, loss=1.0)
    progress.close()
    assert "\r" in stream.getvalue() and "10/10" in stream.getvalue()
