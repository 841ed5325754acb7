"""The session (options, device choice) and the inspector (array in, Result out)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_inspect.card import load_card, read_verified
from edge_inspect.errors import ConfigError, ModelCardError
from edge_inspect.inspector import Inspector, heatmap_overlay
from edge_inspect.kernels import CRITERIA
from edge_inspect.session import create_session, default_threads, session_options
from edge_inspect.synthetic import make_part


@pytest.fixture(scope="module")
def inspector(model_dir):
    return Inspector.load(model_dir, device="cpu", batch_size=4)


def _parts(n, defect=None, seed=0):
    rng = np.random.default_rng(seed)
    return [make_part(rng, size=32, defect=defect)[0] for _ in range(n)]


def test_session_options_are_pinned():
    """The session options are a deliberate choice; change them only with a measurement.

    Threads = the CPUs this process may use (ORT's default, the machine's
    cores, oversubscribes containers and taskset services); one inter-op
    thread, sequential (the graphs are chains); workers spin within a run
    (no wake-up between operators) but not after it (the Numba kernel and
    other processes need those cores next); every graph
    optimisation (NCHWc, fusions); arena and memory pattern on (fixed batch
    shapes reuse their buffers). docs/benchmarks.md has the measurements.
    """
    options = session_options()
    assert options.intra_op_num_threads == default_threads()
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_cpu_mem_arena and options.enable_mem_pattern
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert session_options(threads=1).intra_op_num_threads == 1
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        session_options(threads=0)


def test_cuda_on_a_cpu_only_runtime_is_a_clear_error(model_dir):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ConfigError, match=r"Device 'cuda' was asked for.*no CUDA execution provider.*pip install 'onnxruntime-gpu\[cuda,cudnn\]'"):
        Inspector.load(model_dir, device="cuda")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_cuda_that_silently_falls_back_is_caught(model_dir, monkeypatch):
    """onnxruntime-gpu without its CUDA libraries runs on the CPU with only a warning."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    # Claim a CUDA build: ORT then gets CUDA first in the provider list and
    # falls back to the CPU, as a GPU wheel without its libraries does.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    data = read_verified(load_card(model_dir), "fp32")
    with pytest.raises(ConfigError, match="fell back to CPUExecutionProvider"):
        create_session(data, "cuda")
    session, active = create_session(data, "auto")
    assert active == "cpu" and session.get_providers() == ["CPUExecutionProvider"]


def test_auto_and_cpu_run_on_the_cpu(model_dir, caplog):
    data = read_verified(load_card(model_dir), "fp32")
    with caplog.at_level("INFO", logger="edge_inspect.session"):
        for device in ("auto", "cpu"):
            assert create_session(data, device)[1] == "cpu"
    assert "on cpu (CPUExecutionProvider)" in caplog.text
    with pytest.raises(ConfigError, match="Unknown device 'tpu'"):
        create_session(data, "tpu")


def test_result_has_every_field(inspector):
    result = inspector.inspect(_parts(1)[0], source="a.png")
    assert result.verdict in ("ok", "ng")
    assert result.criterion == "smooth_range" == inspector.card.default_criterion
    assert list(result.criteria) == list(CRITERIA)
    assert result.score == pytest.approx(result.criteria["smooth_range"])  # polarity "high"
    assert result.verdict == ("ng" if result.score > result.threshold else "ok")
    assert result.latency_ms > 0 and result.source == "a.png" and result.anomaly_map is None
    assert set(result.to_dict()) == {"source", "verdict", "score", "raw_score", "threshold", "criterion", "polarity",
                                     "criteria", "latency_ms", "batch_size", "error", "input_note"}
    assert result.input_note is None  # a 32 px grey part, as the model was trained on


def test_batches_give_the_scores_of_single_images(inspector):
    images = _parts(6, seed=3)  # 6 = a full batch of 4 and a partial one
    batched = inspector.inspect_batch(images)
    single = [inspector.inspect(image) for image in images]
    assert [r.batch_size for r in batched] == [4] * 4 + [2] * 2
    for a, b in zip(batched, single):
        assert a.verdict == b.verdict
        assert a.criteria == pytest.approx(b.criteria, rel=1e-5, abs=1e-6)


def test_any_image_array_is_preprocessed_like_training(inspector):
    """uint8, uint16, float and BGR arrays, at any size, go through the shared preprocess."""
    gray = _parts(1, seed=4)[0]
    bgr = np.repeat(gray[:, :, None], 3, axis=2)
    big = np.kron(gray, np.ones((3, 3), np.uint8))  # 96 x 96: area-resized back to 32
    scores = [inspector.inspect(x).criteria["range"] for x in (gray, bgr, gray.astype(np.float32) / 255, big)]
    assert scores == pytest.approx([scores[0]] * 4, abs=2e-3)


def test_prepared_inputs_skip_preprocessing_and_score_the_same(inspector):
    """What the watcher's readers hand over (preprocess output) scores as the decoded image does."""
    from edge_inspect.preprocess import preprocess

    images = _parts(5, seed=6)
    prepared = [preprocess(image, inspector.size) for image in images]
    direct = inspector.inspect_batch(images)
    again = inspector.inspect_batch(prepared, prepared=True)
    assert [r.criteria for r in again] == [r.criteria for r in direct]
    wrong = inspector.inspect_batch([prepared[0], images[1], prepared[2][:16]], prepared=True)
    assert wrong[0].criteria == direct[0].criteria
    assert [r.verdict for r in wrong[1:]] == ["error", "error"]
    assert "a prepared input must be (32, 32) float32, got (32, 32) uint8" in wrong[1].error
    assert "got (16, 32) float32" in wrong[2].error


def test_a_bad_image_gets_an_error_result_and_the_others_go_on(inspector):
    nan_image = np.full((32, 32), np.nan, np.float32)
    results = inspector.inspect_batch([_parts(1)[0], np.zeros((32, 32), np.int32), nan_image])
    assert results[0].verdict in ("ok", "ng")
    assert results[1].verdict == "error" and "Unsupported image dtype int32" in results[1].error
    assert results[2].verdict == "error" and "not finite" in results[2].error
    assert results[2].score is None and results[2].to_dict()["criteria"] == {}


def test_defects_score_higher_than_normal_parts(model_dir):
    # range: the tiny model is trained for one epoch, too little for a smoothed criterion to see 1-px holes
    inspector = Inspector.load(model_dir, device="cpu", batch_size=4, criterion="range")
    normal = [r.score for r in inspector.inspect_batch(_parts(12, seed=20))]
    holes = [r.score for r in inspector.inspect_batch(_parts(12, defect="hole", seed=21))]
    assert np.mean(holes) > np.mean(normal)


def test_criterion_override_and_anomaly_map(model_dir):
    inspector = Inspector.load(model_dir, device="cpu", criterion="mse", anomaly_map=True, sigma=1.0)
    result = inspector.inspect(_parts(1)[0])
    entry = inspector.card.calibration["criteria"]["mse"]
    assert result.criterion == "mse" and result.threshold == entry["threshold"]
    assert result.anomaly_map.shape == (32, 32) and result.anomaly_map.dtype == np.float32
    overlay = heatmap_overlay(np.kron(_parts(1)[0], np.ones((2, 2), np.uint8)), result.anomaly_map)
    assert overlay.shape[1:] == (512, 3) and 32 < overlay.shape[0] < 512 and overlay.dtype == np.uint8  # the part on a canvas, banner below
    with pytest.raises(ConfigError, match="Unknown criterion 'sharpness'"):
        Inspector.load(model_dir, device="cpu", criterion="sharpness")


@pytest.mark.parametrize("name", ["smooth_range", "smooth_min"])
def test_smoothed_criteria_are_selectable_by_name(model_dir, name):
    inspector = Inspector.load(model_dir, device="cpu", criterion=name)
    entry = inspector.card.calibration["criteria"][name]
    assert entry["polarity"] == {"smooth_range": "high", "smooth_min": "low"}[name]
    results = inspector.inspect_batch(_parts(3, seed=5) + _parts(3, defect="hole", seed=6))
    for result in results:
        raw = result.criteria[name]
        assert result.criterion == name and result.threshold == entry["threshold"]
        assert result.score == (raw if entry["polarity"] == "high" else -raw)
        assert result.verdict == ("ng" if result.score > result.threshold else "ok")


def test_runtime_scores_match_the_keras_scorer(model_dir, conv_ae_run):
    """The same images through Keras (export.scoring) and through the runtime: the same criteria."""
    from export.scoring import load_run, score_paths

    run = load_run(conv_ae_run)
    paths = run.held_out_normals()[:6]
    keras_scores = score_paths(run, paths)
    from edge_inspect.preprocess import read_image

    results = Inspector.load(model_dir, device="cpu").inspect_batch([read_image(p) for p in paths])
    runtime_scores = np.array([[r.criteria[name] for name in CRITERIA] for r in results])
    np.testing.assert_allclose(runtime_scores, keras_scores, rtol=1e-4, atol=1e-5)


def test_int8_runs_and_agrees_on_most_verdicts(model_dir):
    fp32 = Inspector.load(model_dir, device="cpu", precision="fp32")
    int8 = Inspector.load(model_dir, device="cpu", precision="int8")
    images = _parts(8, seed=30)
    a, b = fp32.inspect_batch(images), int8.inspect_batch(images)
    assert int8.precision == "int8"
    assert np.abs(np.array([r.score for r in a]) - np.array([r.score for r in b])).max() < 0.05


def test_a_graph_for_a_newer_runtime_names_the_versions_and_the_fix(model_dir):
    proto = onnx.load_from_string(read_verified(load_card(model_dir), "fp32"))
    proto.ir_version = 99  # beyond what any ONNX Runtime reads
    with pytest.raises(ModelCardError, match=r"(?s)IR version: 99.*newer ONNX Runtime than this one \(.*upgrade onnxruntime"):
        create_session(proto.SerializeToString(), "cpu")


def test_what_the_cuda_preload_prints_goes_to_the_log_not_stdout(monkeypatch, capsys, caplog):
    """predict writes results to stdout; ORT's preload_dlls reports missing libraries with print."""
    from edge_inspect import session

    def preload():
        print("Failed to load libcublasLt.so.13: not found")
        raise OSError("no CUDA here")

    monkeypatch.setattr(ort, "preload_dlls", preload, raising=False)
    session._preload_cuda_libraries.cache_clear()
    try:
        with caplog.at_level("DEBUG", logger="edge_inspect.session"):
            session._preload_cuda_libraries()
            session._preload_cuda_libraries()  # once per process
    finally:
        session._preload_cuda_libraries.cache_clear()
    assert capsys.readouterr().out == ""
    assert caplog.text.count("libcublasLt.so.13") == 1 and "no CUDA here" in caplog.text


def test_the_default_batch_is_the_models_and_a_configured_one_wins(model_dir, tiny_base, tmp_path):
    """The linear-ae reads its weights once a run, so it batches 32; the deep models stay at 8."""
    from export.to_onnx import export_run
    from tests.runtime.conftest import tiny_run

    linear = tmp_path / "linear"
    export_run(tiny_run("linear-ae", tiny_base), linear)
    assert Inspector.load(linear, device="cpu").batch_size == 32
    assert Inspector.load(model_dir, device="cpu").batch_size == 8
    assert Inspector.load(linear, device="cpu", batch_size=3).batch_size == 3
    parts = [make_part(np.random.default_rng(k), size=32)[0] for k in range(40)]
    assert [r.batch_size for r in Inspector.load(linear, device="cpu").inspect_batch(parts)] == [32] * 32 + [8] * 8
