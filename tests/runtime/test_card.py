"""The model card: loading validates schema, preprocessing, checksum and embedded metadata."""

import json
import shutil

import pytest

from edge_inspect.card import CARD_FILE, PRECISIONS, load_card, read_verified, sha256_file
from edge_inspect.errors import ModelCardError
from edge_inspect.inspector import Inspector


@pytest.fixture
def model_copy(model_dir, tmp_path):
    """A copy of the shared model folder that a test may tamper with."""
    return shutil.copytree(model_dir, tmp_path / "model")


def _edit_card(folder, edit):
    path = folder / CARD_FILE
    card = json.loads(path.read_text())
    edit(card)
    path.write_text(json.dumps(card))


def test_a_valid_folder_loads(model_dir):
    card = load_card(model_dir)
    assert card.size == (32, 32)
    assert card.precisions == [p for p in PRECISIONS if p in ("fp32", "int8")]
    assert read_verified(card, "fp32") == (model_dir / "model.onnx").read_bytes()
    assert card.data["files"]["fp32"]["sha256"] == sha256_file(model_dir / "model.onnx")


def test_tampered_model_is_refused_with_the_reason(model_copy):
    data = bytearray((model_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    (model_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelCardError, match=r"model.onnx does not match its model card: sha256 .* modified or replaced"):
        Inspector.load(model_copy, device="cpu")


def test_a_model_swapped_for_another_precision_is_refused(model_copy):
    shutil.copy(model_copy / "model.int8.onnx", model_copy / "model.onnx")
    with pytest.raises(ModelCardError, match="does not match its model card"):
        Inspector.load(model_copy, precision="fp32", device="cpu")


def test_an_edited_card_is_refused_naming_the_key(model_copy):
    """A card edited after export no longer matches the card inside the graph."""

    def lower_threshold(card):
        name = card["calibration"]["default_criterion"]
        card["calibration"]["criteria"][name]["threshold"] *= 0.5

    _edit_card(model_copy, lower_threshold)
    with pytest.raises(ModelCardError, match=r"differ at 'calibration\.criteria\.smooth_range\.threshold'"):
        Inspector.load(model_copy, device="cpu")


def test_a_newer_schema_asks_for_an_upgrade(model_copy):
    _edit_card(model_copy, lambda card: card.update(schema=2))
    with pytest.raises(ModelCardError, match="schema 2 is newer .* Upgrade edge-inspect"):
        load_card(model_copy)


def test_other_preprocessing_is_refused(model_copy):
    _edit_card(model_copy, lambda card: card["preprocessing"].update(interpolation="linear"))
    with pytest.raises(ModelCardError, match="'preprocessing.interpolation': this runtime implements 'area' only"):
        load_card(model_copy)


def test_a_missing_key_is_named(model_copy):
    _edit_card(model_copy, lambda card: card.pop("opset"))
    with pytest.raises(ModelCardError, match="at 'opset': expected a int"):
        load_card(model_copy)


def test_a_missing_precision_says_how_to_export_it(model_dir):
    with pytest.raises(ModelCardError, match="has no fp16 model; it holds fp32, int8.*--precision fp16"):
        Inspector.load(model_dir, precision="fp16", device="cpu")


def test_a_run_folder_is_not_a_model_folder(conv_ae_run):
    with pytest.raises(ModelCardError, match="not a model folder.*export it first"):
        load_card(conv_ae_run)


def test_a_missing_folder(tmp_path):
    with pytest.raises(ModelCardError, match="does not exist"):
        load_card(tmp_path / "nowhere")


def test_truncated_card(model_copy):
    text = (model_copy / CARD_FILE).read_text()
    (model_copy / CARD_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ModelCardError, match="not valid JSON"):
        load_card(model_copy)
