"""Models: the architectures (arch), training (train), the teacher and its model folder (teacher), ONNX export."""
