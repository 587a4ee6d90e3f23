"""The representation probe: reads the convert stage's weights, is deterministic, names bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from regioncl.cli import main
from regioncl.convert import convert_checkpoint
from regioncl.data.embedded import EmbeddedSettings, generate_embedded
from regioncl.models.backbone import ResNetBackbone
from regioncl.probe import ProbeSettings, load_backbone, run_probe
from regioncl.tables.summary import load_metrics, summarize
from regioncl.weights import write_pretrained_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = ProbeSettings(max_iterations=100)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe_data")
    generate_embedded(out, EmbeddedSettings(seed=5, n_unlabeled=0, n_train=10, n_val=5, image_size=96))
    return out


def converted_weights(directory: Path, backbone: ResNetBackbone, method: str = "moco_v2") -> Path:
    """``backbone`` as the pretrain and convert stages write it: ``{directory}/run.tv.pth``."""
    checkpoint = directory / "checkpoint_final.pt"
    state = {k: v for k, v in backbone.state_dict().items()}
    write_pretrained_checkpoint(
        checkpoint, method=method, arch="resnet18", steps=1, epochs=1, backbone=state, transfer={}, config={}
    )
    convert_checkpoint(checkpoint, directory / "run.tv.pth", directory / "run.d2.pkl")
    return directory / "run.tv.pth"


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


def test_a_checkpoint_is_probed_with_its_own_weights(dataset: Path, tmp_path: Path) -> None:
    random = run_probe(None, "resnet18", dataset, tmp_path / "random.json", SETTINGS)
    torch.manual_seed(SETTINGS.seed)  # the very initialisation `none` draws, through convert
    same = converted_weights(tmp_path, ResNetBackbone("resnet18"))
    through_files = run_probe(same, "resnet18", dataset, tmp_path / "same.json", SETTINGS)
    assert through_files["metrics"] == random["metrics"]
    assert through_files["method"] == "moco_v2" and random["method"] == "random"
    assert through_files["run"] == "run" and random["run"] == "random"

    # Another initialisation is loaded as it is, not replaced by the probe's own seed.
    torch.manual_seed(SETTINGS.seed + 1)
    other = ResNetBackbone("resnet18")
    loaded, method = load_backbone(converted_weights(tmp_path, other), "resnet18", SETTINGS.seed)
    assert method == "moco_v2"
    for key, tensor in other.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[key], tensor), key
    accuracy = random["metrics"]["probe"]["accuracy"]
    assert 0 <= accuracy <= 100
    assert random["probe"]["val_boxes"] >= 5 and random["probe"]["feature_dim"] == 256  # R18 C4


def test_probe_is_deterministic(dataset: Path, tmp_path: Path) -> None:
    first = run_probe(None, "resnet18", dataset, tmp_path / "a.json", SETTINGS, run="random", benchmark="b")
    second = run_probe(None, "resnet18", dataset, tmp_path / "b.json", SETTINGS, run="random", benchmark="b")
    assert without_timing(first) == without_timing(second)
    assert without_timing(json.loads((tmp_path / "a.json").read_text())) == without_timing(first)


def test_cli_writes_a_metrics_record_the_summary_shows_as_a_column(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    main([
        "probe", "--weights", "none", "--arch", "resnet18", "--data", str(dataset), "--settings",
        '{"max_iterations": 100}', "--run", "random", "--benchmark", "embedded_frcnn_r18fpn", "--out", str(out),
    ])
    record = json.loads(out.read_text())
    assert (record["run"], record["method"], record["benchmark"]) == ("random", "random", "embedded_frcnn_r18fpn")
    table = summarize(load_metrics([out]))
    assert table.loc[0, "probe accuracy mean"] == pytest.approx(record["metrics"]["probe"]["accuracy"])


def test_missing_weights_file_is_named(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.tv\.pth"):
        run_probe(tmp_path / "nowhere.tv.pth", "resnet18", dataset, tmp_path / "p.json", SETTINGS)


def test_weights_of_another_format_are_named(dataset: Path, tmp_path: Path) -> None:
    bad = tmp_path / "detector.pth"
    torch.save({"format": "regioncl.detector/1", "state_dict": {}}, bad)
    with pytest.raises(ValueError, match=r"detector\.pth.*regioncl\.detector/1"):
        run_probe(bad, "resnet18", dataset, tmp_path / "p.json", SETTINGS)


def test_weights_of_another_arch_or_missing_tensors_are_named(dataset: Path, tmp_path: Path) -> None:
    weights = converted_weights(tmp_path, ResNetBackbone("resnet18"))
    with pytest.raises(ValueError, match=r"run\.tv\.pth.*arch is 'resnet18'.*'resnet34'"):
        run_probe(weights, "resnet34", dataset, tmp_path / "p.json", SETTINGS)
    payload = torch.load(weights, weights_only=True)
    del payload["state_dict"]["backbone.body.layer3.0.conv1.weight"]
    torch.save(payload, weights)
    with pytest.raises(ValueError, match=r"(?s)run\.tv\.pth.*resnet18 backbone.*missing backbone key layer3\.0\.conv1\.weight"):
        run_probe(weights, "resnet18", dataset, tmp_path / "p.json", SETTINGS)


def test_missing_annotations_are_named(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"instances_train\.json"):
        run_probe(None, "resnet18", tmp_path, tmp_path / "p.json", SETTINGS)
    assert not (tmp_path / "p.json").exists()
