"""Engine exports: ONNX, ModelOpt Q/DQ, TensorRT-RTX builds (`make engines`)."""
