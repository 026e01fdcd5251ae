"""Federated training of ONNX models: clients on the nodes, one aggregator, secure aggregation.

model (ONNX ↔ numpy) · training (local SGD, FedProx, DP noise) · data (the node's npz) · secagg (the
cryptography and ring arithmetic) · transport (HTTP wire) · client · aggregator (the rounds) · aggregator_http
(its HTTP side) · validation (what clients claim, checked) · checkpoint (state dir and store) · metrics · cli.
"""
