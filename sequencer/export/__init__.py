"""Deployment: ONNX and TorchScript export (checked against PyTorch) and top-k prediction."""
from .export import ExportError, export_onnx, export_torchscript, verify_onnx, verify_torchscript
from .predict import predict

__all__ = ['ExportError', 'export_onnx', 'export_torchscript', 'verify_onnx', 'verify_torchscript', 'predict']
