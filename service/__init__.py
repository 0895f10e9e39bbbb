"""The digit-recognition server: ONNX model, preprocessing, dynamic batcher and protocol adapters.

Never imports `training` or torch: the only contract with training is the ONNX file and its metadata
(see `service.recognition.model_metadata`).
"""

__version__ = "1.0.0"
