"""Export side of cfr-icl: checkpoint -> ONNX graph of the runtime contract (and TensorRT plans)."""
