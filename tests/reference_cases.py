"""What the tests comparing against ONNX Runtime and the NumPy reference share: Conv layer variants, a
direct call of onnxruntime.quantization.quantize_dynamic, and plain ORT predictions."""

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

CONV_CASES = {
    "3x3_pad1_bias": dict(x=(3, 3, 6, 6), w=(4, 3, 3, 3), bias=True, attrs=dict(pads=[1, 1, 1, 1])),
    "stride2_asym_pad_dil2": dict(
        x=(2, 3, 9, 8), w=(5, 3, 3, 2), bias=True, attrs=dict(strides=[2, 1], pads=[0, 1, 2, 0], dilations=[2, 1])
    ),
    "group2_stride2_nobias": dict(x=(2, 4, 7, 7), w=(6, 2, 3, 3), bias=False, attrs=dict(group=2, strides=[2, 2])),
    "depthwise_bias": dict(x=(2, 4, 5, 5), w=(4, 1, 3, 3), bias=True, attrs=dict(group=4, pads=[1, 1, 1, 1])),
    "1x1_bias": dict(x=(4, 8, 3, 3), w=(2, 8, 1, 1), bias=True, attrs={}),
    "1x1_nobias": dict(x=(4, 8, 3, 3), w=(2, 8, 1, 1), bias=False, attrs={}),
}


def conv_kwargs(attrs: dict) -> dict:
    """ONNX Conv attributes as the keyword arguments of numpy_reference.conv_layer."""
    return dict(
        strides=tuple(attrs.get("strides", (1, 1))),
        pads=tuple(attrs.get("pads", (0, 0, 0, 0))),
        dilations=tuple(attrs.get("dilations", (1, 1))),
        group=attrs.get("group", 1),
    )


def ort_quantize_dynamic(model, out: Path, per_channel: bool = False, reduce_range: bool = False, **options) -> onnx.ModelProto:
    """ORT's own tool on a model (proto or path) with int8 weights over Conv, MatMul and Gemm."""
    logging.disable(logging.WARNING)  # quantize_dynamic warns about missing pre-processing
    try:
        quantize_dynamic(model, out, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                         per_channel=per_channel, reduce_range=reduce_range, **options)
    finally:
        logging.disable(logging.NOTSET)
    return onnx.load(str(out))


def ort_labels(model: Path | str | onnx.ModelProto, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Top-1 labels of a model file or proto run directly on ONNX Runtime, fed in batches of batch_size."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = [session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(logits).argmax(axis=1)
