"""The MLServer runtime `digits bench --peer mlserver` serves the model with: onnxruntime on the CPU,
the same session options as `digits serve` (1 intra-op thread here, no spinning), FP32 tensors in the
model's own (normalized) input space in, its outputs out. MLServer imports this file from the model
folder the bench writes; it needs only mlserver, numpy and onnxruntime (MLServer runs in its own
virtual environment: it needs protobuf < 7, this project protobuf 7)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxDigits(MLModel):
    async def load(self) -> bool:
        extra: dict[str, Any] = dict(self.settings.parameters.extra or {})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(extra.get("threads", 1))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(str(self.settings.parameters.uri), options,
                                                     providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = [output.name for output in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        tensor = self.decode(payload.inputs[0], default_codec=NumpyCodec)
        results = self._session.run(None, {self._input: np.ascontiguousarray(tensor, dtype=np.float32)})
        wanted = {output.name for output in payload.outputs or []} or set(self._outputs)
        return InferenceResponse(
            model_name=self.name, model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(self._outputs, results, strict=True)
                     if name in wanted])
