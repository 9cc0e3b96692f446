"""Inference runtimes: trained modules exported to ONNX, and run by ONNX Runtime on numpy arrays.

Training stays in PyTorch; a bundle carries ONNX exports of the user tower and the
ranker, and the server runs those with ONNX Runtime, so a request does no torch work.
One intra-op thread, sequential execution and no spinning: a request's tensors are
small, and worker threads spinning for work would take the cores the gRPC threads and
the other server processes need.
"""

import logging
import os
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

log = logging.getLogger("funnel.runtime")

RUNTIMES: tuple[str, ...] = ("onnx", "torch")
"""``onnx``: ONNX Runtime over the bundle's exports (serving's default); ``torch``: the frozen PyTorch modules."""

ONNX_IR_VERSION = 10
"""IR version written into every export: what the exporter emits and onnxruntime >= 1.17 reads."""


def export_onnx(module: nn.Module, inputs: Mapping[str, torch.Tensor], dynamic: Mapping[str, Mapping[int, object]], outputs: list[str], path: str, *, as_dict: str | None = None) -> None:
    """Export ``module`` (eval mode) to an ONNX file with named inputs, outputs and dynamic dimensions.

    Args:
        module: the trained module; its forward takes the inputs as keyword arguments,
            or as one dict argument named ``as_dict``.
        inputs: input name -> an example tensor (small shapes are enough).
        dynamic: input name -> {dimension: ``torch.export.Dim``} for the dimensions that vary.
        outputs: names of the module's outputs, in order.
        path: the file to write.
        as_dict: the name of the forward's dict argument, when it takes one.
    """
    kwargs = {as_dict: dict(inputs)} if as_dict else dict(inputs)
    shapes = {as_dict: dict(dynamic)} if as_dict else dict(dynamic)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # the exporter logs each step and every missing optional op set
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(), (), None, kwargs=kwargs, input_names=list(inputs), output_names=outputs, dynamic_shapes=shapes, dynamo=True, verbose=False
            )
    finally:
        onnx_logger.setLevel(level)
    program.model.ir_version = ONNX_IR_VERSION
    program.save(path)


class OnnxModel:
    """An ONNX file run by ONNX Runtime on the CPU, one intra-op thread, no spinning.

    Args:
        path: the ``.onnx`` file.
        outputs: run only the part of the graph these outputs need (default: every
            output). ONNX Runtime computes every node whatever outputs a call asks for,
            so a caller that never needs an output gets a session without its nodes.

    Raises:
        ValueError: the file cannot be read as an ONNX model by this onnxruntime, or
            lacks one of ``outputs``.
    """

    def __init__(self, path: str, outputs: tuple[str, ...] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            source = path if outputs is None else _subgraph(path, outputs)
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnx and onnxruntime raise their own exception types for every kind of bad file
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path}: not a model this onnxruntime can run ({first})") from err
        self.path = os.path.abspath(path)
        self.inputs = tuple(i.name for i in self.session.get_inputs())
        self.outputs = tuple(o.name for o in self.session.get_outputs())

    def __call__(self, **arrays: np.ndarray) -> list[np.ndarray]:
        """Run the model.

        Args:
            arrays: one array per input name, of the input's dtype.

        Returns:
            The outputs, in the model's output order.
        """
        return self.session.run(None, arrays)


def _subgraph(path: str, outputs: tuple[str, ...]) -> bytes:
    """The serialized part of the ONNX model at ``path`` that computes ``outputs`` from all of its inputs."""
    import onnx
    import onnx.utils

    model = onnx.load(path)
    missing = set(outputs) - {o.name for o in model.graph.output}
    if missing:
        raise ValueError(f"the model has no output {sorted(missing)[0]!r}")
    inputs = [i.name for i in model.graph.input]
    return onnx.utils.Extractor(model).extract_model(inputs, list(outputs)).SerializeToString()
