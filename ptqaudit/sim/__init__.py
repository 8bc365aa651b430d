"""The PyTorch simulator: fast, differentiable, and in agreement with ONNX Runtime's integer kernels."""
