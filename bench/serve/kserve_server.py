"""KServe's ModelServer around onnxruntime, the way KServe's docs write a custom model (runs in the kserve venv).

usage: kserve_server.py MODEL.onnx NAME HTTP_PORT GRPC_PORT THREADS
"""

import sys

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse
from kserve.utils.numpy_codec import from_np_dtype
from kserve.utils.utils import generate_uuid


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str, threads: int):
        super().__init__(name)
        self.path, self.threads = path, threads
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        results = self.session.run(None, feeds)
        binary = bool((payload.parameters or {}).get("binary_data_output", False))
        outputs = []
        for name, array in zip(self.output_names, results, strict=True):
            output = InferOutput(name=name, shape=list(array.shape), datatype=from_np_dtype(array.dtype))
            output.set_data_from_numpy(array, binary_data=binary)
            outputs.append(output)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or generate_uuid())


if __name__ == "__main__":
    path, name, http_port, grpc_port, threads = sys.argv[1:6]
    model = OnnxModel(name, path, int(threads))
    kserve.ModelServer(http_port=int(http_port), grpc_port=int(grpc_port), workers=1).start([model])
