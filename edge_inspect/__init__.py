"""edge-inspect: autoencoder-based visual anomaly detection for factory PCs.

The package is the lean runtime (ONNX Runtime, Numba, OpenCV) and the CLI.
The training side lives in the sibling package ``export`` and is installed
with the ``train`` extra; nothing here imports TensorFlow.
"""

__version__ = "0.1.0"
