"""Open Inference Protocol v2 (KServe v2 / Triton) codecs, and the generated gRPC modules."""
