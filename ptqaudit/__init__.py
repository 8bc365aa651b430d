"""ptqaudit: audits how badly ONNX Runtime dynamic post-training quantization can hurt a classifier."""

__version__ = "0.1.0"
