"""The ONNX Runtime session: options, execution provider, device choice.

One session per loaded model, created once with explicit options (see
:func:`session_options` for each choice and why), on the device asked for:

- ``cpu``: the CPU execution provider;
- ``cuda``: the CUDA execution provider, or a :class:`ConfigError`. ONNX
  Runtime silently falls back to the CPU when the CUDA or cuDNN libraries
  do not load, so the providers the session really got are checked after
  it is created;
- ``auto``: CUDA when it really loads, the CPU otherwise.

Before a CUDA session, the CUDA and cuDNN libraries are loaded from NVIDIA's
pip packages (``onnxruntime-gpu[cuda,cudnn]``) where those are installed,
through ONNX Runtime's own ``preload_dlls``: the provider's library finds
them only on the system's library path otherwise.

The provider that runs is logged and returned.

    >>> session, device = create_session(model_bytes, device="auto")
    >>> device
    'cpu'
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os

import onnxruntime as ort

from edge_inspect.errors import ConfigError, ModelCardError

log = logging.getLogger(__name__)

# A line PC's service user has no writable home: ONNX Runtime's telemetry would log a warning at every
# start that it cannot persist its device id; it sends nothing the line needs.
if hasattr(ort, "disable_telemetry_events"):
    ort.disable_telemetry_events()

DEVICES = ("auto", "cpu", "cuda")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from NVIDIA's pip packages or the library path, once per process.

    ``preload_dlls`` reports what it cannot load with ``print``; that must
    not reach stdout, where ``predict`` writes its results, so it goes to
    the log instead. A failure here is not final: the session's providers
    are checked after it is created.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # ONNX Runtime before 1.21
        return
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            preload()
    except Exception as exc:  # noqa: BLE001 - a failed preload leaves the usual library search
        log.debug("Preloading the CUDA libraries failed: %s", exc)
    for line in said.getvalue().splitlines():
        log.debug("preload_dlls: %s", line.strip())


def default_threads() -> int:
    """CPUs this process may run on (taskset and cgroup CPU sets respected)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The options of every inference session.

    - ``intra_op_num_threads = threads`` (default: the CPUs this process
      may use). ORT's own default is the machine's core count, which
      oversubscribes a container or a ``taskset``-limited service.
    - ``inter_op_num_threads = 1`` and sequential execution: the graphs are
      a chain of layers (the dilation box's four branches are the only
      parallel part), so a second pool would only add threads that compete
      with the intra-op pool and the Numba kernel.
    - Worker threads spin within a run and stop at its end
      (``session.intra_op.allow_spinning = 1``,
      ``session.force_spinning_stop = 1``). Between the operators of one
      run a spinning worker picks up the next piece of work at once; a
      blocked one must be woken, and after an idle spell (a lone part on a
      quiet line) those wake-ups made the p95 of a lone int8 image 26.7 ms
      instead of 17.2 (p50 15.7 instead of 14.0; a 2-vCPU VM). By default
      ORT's workers also spin after a run, waiting for more work, while the
      Numba criteria kernel wants those same cores; on a 2-core line PC that
      slows the kernel and every other process. Measured in
      ``docs/benchmarks.md``.
    - ``graph_optimization_level = ORT_ENABLE_ALL``: constant folding,
      Conv+activation fusion and the NCHWc layout for AVX2/AVX-512.
    - ``enable_cpu_mem_arena`` and ``enable_mem_pattern`` on: batches have a
      fixed shape, so after the first run every buffer is reused from the
      arena instead of allocated per run.
    - ``log_severity_level = 3`` (errors): ORT's provider warnings are
      replaced by this module's own checks and messages.

    Raises:
        ConfigError: ``threads`` < 1.
    """
    threads = default_threads() if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}.")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def create_session(
    model: bytes | str | os.PathLike,
    device: str = "auto",
    *,
    threads: int | None = None,
    name: str = "model",
) -> tuple[ort.InferenceSession, str]:
    """Create the inference session of ``model`` on ``device``.

    Args:
        model: the ONNX graph, as bytes (what :func:`edge_inspect.card.read_verified`
            returns) or a path.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: CPU threads of the session (see :func:`session_options`).
        name: how to name the model in messages.

    Returns:
        ``(session, active)``, ``active`` being ``"cuda"`` or ``"cpu"``:
        the provider the session really runs on.

    Raises:
        ConfigError: an unknown device; ``cuda`` asked for but not available
            in this ONNX Runtime build, or available but not loaded (missing
            CUDA or cuDNN libraries, no GPU).
    """
    if device not in DEVICES:
        raise ConfigError(f"Unknown device {device!r}. Expected one of: {', '.join(DEVICES)}.")
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    options = session_options(threads)
    available = ort.get_available_providers()
    cuda_built = _PROVIDERS["cuda"] in available
    if device == "cuda" and not cuda_built:
        raise ConfigError(
            f"Device 'cuda' was asked for, but this ONNX Runtime ({ort.__version__}, {ort.get_device()} build) "
            f"has no CUDA execution provider (it has: {', '.join(available)}). Install the GPU runtime with: "
            "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]' (or deploy/install.sh --gpu); or use --device cpu or auto."
        )
    if device == "cpu" or (device == "auto" and not cuda_built):
        providers = [_PROVIDERS["cpu"]]
    else:
        _preload_cuda_libraries()
        providers = [_PROVIDERS["cuda"], _PROVIDERS["cpu"]]
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        hint = ""
        if "IR version" in str(exc):
            hint = (f" The graph was written for a newer ONNX Runtime than this one ({ort.__version__}): upgrade "
                    "onnxruntime (or onnxruntime-gpu), or export the model again with this edge-inspect, whose "
                    "graphs need only what their opset needs.")
        raise ModelCardError(f"ONNX Runtime cannot load {name}: {exc}{hint}") from exc
    active_providers = session.get_providers()
    active = "cuda" if active_providers and active_providers[0] == _PROVIDERS["cuda"] else "cpu"
    if device == "cuda" and active != "cuda":
        raise ConfigError(
            f"Device 'cuda' was asked for, but ONNX Runtime fell back to {', '.join(active_providers)}: the CUDA "
            "execution provider did not load. Check that the CUDA and cuDNN libraries onnxruntime-gpu needs are "
            "installed and that a GPU is visible (nvidia-smi); or use --device cpu or auto."
        )
    if device == "auto" and cuda_built and active != "cuda":
        log.warning("CUDA execution provider did not load; running %s on the CPU.", name)
    log.info("Running %s on %s (%s)", name, active, active_providers[0])
    return session, active
