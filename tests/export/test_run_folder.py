"""RunFolder: what training wrote reads back through it, and a folder with parts missing says what is missing."""

import json
import shutil

import pytest

from edge_inspect.errors import ModelCardError
from export.run_folder import RunFolder
from tests.runtime.conftest import conv_ae_run, tiny_base  # noqa: F401  (shared fixtures)


def test_a_trained_and_calibrated_run_reads_back(conv_ae_run):  # noqa: F811
    run = RunFolder(conv_ae_run)
    assert run.missing() == [] and run.model_file == conv_ae_run / "model.keras" and run.has_checkpoint
    config = run.config()
    assert config["train"]["model"] == "conv-ae" and config["preprocessing"]["height"] == 32
    split = json.loads((conv_ae_run / "split.json").read_text())
    assert [p.name for p in run.held_out_normals()] == [rel.split("/")[-1] for rel in split["val"]]
    assert len(run.training_images()) == len(split["train"]) == config["data"]["n_train"]
    assert run.state()["epoch"] == 1 and run.calibration()["default_criterion"]
    run.require_calibration("evaluate")  # calibrated: no error


def test_an_empty_folder_lacks_everything(tmp_path):
    run = RunFolder(tmp_path)
    assert run.model_file is None and not run.has_checkpoint
    assert run.missing() == ["model.npz or model.keras", "config.json", "split.json"]
    assert run.state() == {} and run.exports() == []
    with pytest.raises(ModelCardError, match=f"no calibration.json.*Run: edge-inspect calibrate {tmp_path}"):
        run.require_calibration("evaluate")


def test_held_out_images_gone_are_named(conv_ae_run, tmp_path):  # noqa: F811
    copy = tmp_path / "run"
    shutil.copytree(conv_ae_run, copy)
    split = json.loads((copy / "split.json").read_text())
    split["val"][0] = "gone.png"
    (copy / "split.json").write_text(json.dumps(split))
    with pytest.raises(ModelCardError, match=r"1 of the run's \d+ held-out normal images are gone.*The check needs"):
        RunFolder(copy).held_out_normals("The check")


def test_exports_keep_the_latest_per_folder_and_survive_a_broken_file(tmp_path):
    run = RunFolder(tmp_path)
    card = {"exported_at": "2026-11-29T14:25:01+00:00", "files": {"fp32": {}, "int8": {}}, "default_precision": "fp32"}
    run.record_export(tmp_path / "m", card)
    run.record_export(tmp_path / "n", card)
    run.record_export(tmp_path / "m", {**card, "exported_at": "2026-11-30T08:00:00+00:00"})
    recorded = json.loads(run.exports_path.read_text())["exports"]
    assert [(e["folder"], e["exported_at"][:10]) for e in recorded] == [
        (str((tmp_path / "n").resolve()), "2026-11-29"), (str((tmp_path / "m").resolve()), "2026-11-30")]
    assert recorded[0]["precisions"] == ["fp32", "int8"]
    run.exports_path.write_text("{not json")
    assert run.exports() == []
    run.record_export(tmp_path / "m", card)  # a broken record is replaced, not a reason to fail the export
    assert [e["folder"] for e in run.exports()] == [str((tmp_path / "m").resolve())]


def test_writes_are_whole_files_read_back_as_written(tmp_path):
    run = RunFolder(tmp_path)
    run.write_split(tmp_path / "images", ["a/1.png", "a/2.png"], ["b/3.png"])
    assert run.split() == {"root": str(tmp_path / "images"), "train": ["a/1.png", "a/2.png"], "val": ["b/3.png"]}
    assert run.training_images() == [tmp_path / "images" / "a" / "1.png", tmp_path / "images" / "a" / "2.png"]
    run.write_history([{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "val_loss": 0.3}])
    assert run.history_path.read_text().splitlines() == ["epoch,loss,val_loss", "1,0.5,", "2,0.25,0.3"]
    run.write_skipped([(tmp_path / "x.png", "cannot be decoded")])
    assert run.skipped_path.read_text() == f"{tmp_path / 'x.png'}\tcannot be decoded\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "skipped.txt", "split.json"]  # no temporaries
