"""`distill export`: merged HF model + model card, int8 (torchao) with a parity report, GGUF, ONNX (`export`);
modules int8.py, gguf.py, onnx.py, and export.py (loading + the command).

Named `exporting` (not `export`) so the package never hides the public function `distill.export`."""
