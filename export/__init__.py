"""The training side of edge-inspect: Keras models, training, evaluation and ONNX export.

Only this package imports TensorFlow and Keras; it is installed with the
``train`` extra and may import the runtime's contract (``edge_inspect``: the
model-card schema, preprocessing, the reference scorers), never the other way
round. The runtime on the line loads the exported ONNX graph and model card.

    >>> from export.models import build_model
    >>> model = build_model("vae", (128, 128), seed=0)
"""
