"""`distill export`: merged HF model + model card, int8 with a parity report, ONNX (`export`).

Named `exporting` (not `export`) so the package never hides the public function `distill.export`."""
