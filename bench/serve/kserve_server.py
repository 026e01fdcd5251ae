"""KServe's ModelServer around onnxruntime, the way KServe's docs write a custom model (runs in the kserve venv).

usage: kserve_server.py MODEL.onnx NAME HTTP_PORT GRPC_PORT THREADS [TRITON_CONFIG.json]

With TRITON_CONFIG (bench/perf_analyzer.py), the server also answers the one thing perf_analyzer asks a
Triton server for that KServe lacks: the model's configuration (`GET /v2/models/NAME/config`, gRPC ModelConfig),
from the file's "json" document and "grpc" serialized ModelConfigResponse (base64). perf_analyzer reads it
once, before measuring; inference goes through KServe's own endpoints.
"""

import base64
import json
import sys

import grpc
import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse
from kserve.protocol.grpc import server as grpc_server
from kserve.protocol.rest import server as rest_server
from kserve.utils.numpy_codec import from_np_dtype
from kserve.utils.utils import generate_uuid

OIP = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(double)": "FP64"}


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

    def _types(self, nodes):
        return [
            {"name": n.name, "datatype": OIP[n.type], "shape": [d if isinstance(d, int) else -1 for d in n.shape]}
            for n in nodes
        ]

    def get_input_types(self):
        return self._types(self.session.get_inputs())

    def get_output_types(self):
        return self._types(self.session.get_outputs())

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        results = self.session.run(None, feeds)
        binary = payload.use_binary_outputs
        outputs = []
        for name, array in zip(self.output_names, results, strict=True):
            output = InferOutput(name=name, shape=list(array.shape), datatype=from_np_dtype(array.dtype))
            output.set_data_from_numpy(array, binary_data=binary)
            outputs.append(output)
        # binary outputs as asked, per request or per output (as KServe's own runtimes build their responses)
        return InferResponse(
            model_name=self.name,
            infer_outputs=outputs,
            response_id=payload.id or generate_uuid(),
            use_binary_outputs=binary,
            requested_outputs=payload.request_outputs,
        )


def answer_triton_config(name: str, document: dict, serialized: bytes) -> None:
    """Adds the model-configuration endpoints to KServe's REST and gRPC servers."""
    register_endpoints = rest_server.RESTServer._register_endpoints

    def with_config(self, app):
        app.add_api_route(f"/v2/models/{name}/config", lambda: document, methods=["GET"])
        register_endpoints(self, app)

    rest_server.RESTServer._register_endpoints = with_config
    add_servicer = grpc_server.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server

    async def model_config(request, context):
        return serialized

    def with_model_config(servicer, server):
        add_servicer(servicer, server)
        handler = grpc.unary_unary_rpc_method_handler(model_config)  # raw bytes both ways
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelConfig": handler})]
        )

    grpc_server.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server = with_model_config


if __name__ == "__main__":
    path, name, http_port, grpc_port, threads = sys.argv[1:6]
    if len(sys.argv) > 6:
        with open(sys.argv[6]) as file:
            config = json.load(file)
        answer_triton_config(name, config["json"], base64.b64decode(config["grpc"]))
    model = OnnxModel(name, path, int(threads))
    kserve.ModelServer(http_port=int(http_port), grpc_port=int(grpc_port), workers=1).start([model])
