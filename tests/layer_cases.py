"""Conv layer variants shared by the tests that check quantized layers against the NumPy reference."""

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
