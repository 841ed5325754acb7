"""edge-inspect: autoencoder-based visual anomaly detection for factory PCs.

The package is the lean runtime (ONNX Runtime, Numba, OpenCV) and the CLI.
The training side lives in the sibling package ``export`` and is installed
with the ``train`` extra; nothing here imports TensorFlow.
"""

from edge_inspect.imageheader import guard_opencv

__version__ = "0.1.0"

# OpenCV reads its own pixel guard from the environment once, when cv2 is
# first imported: this runs before any module of the package imports it.
guard_opencv()
