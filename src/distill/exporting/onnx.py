"""ONNX export: a logits-only graph (input_ids, attention_mask -> logits) checked against onnxruntime."""

from __future__ import annotations

import warnings
from pathlib import Path

ONNX_HINT = 'ONNX export needs onnx and onnxruntime: pip install "distill[onnx]"'


def _bytes(directory: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob(pattern) if p.is_file())


def _logits_only(model):
    """(input_ids, attention_mask) -> logits, no cache: the graph ONNX runtimes can run as is."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return LogitsOnly(model).eval()


def export_onnx(model, tokenizer, out_dir: str | Path, atol: float = 1e-3) -> dict:
    """torch.onnx (dynamo) export with dynamic batch and sequence axes, then onnxruntime vs torch on a
    batch of another shape with left padding; the max abs diff over attended positions is reported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as exc:
        raise ImportError(f"{ONNX_HINT} ({exc})") from exc
    import torch
    from torch.export import Dim

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    wrapper = _logits_only(model.float().cpu().eval())
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 8))
    batch, seq = Dim("batch"), Dim("seq")
    large = sum(p.numel() for p in model.parameters()) * 4 > 1_500_000_000  # protobuf's 2 GB cap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (ids, torch.ones_like(ids)), str(path), dynamo=True,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                          external_data=large)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    test_ids = torch.randint(3, vocab, (3, 13), generator=gen)
    test_mask = torch.ones_like(test_ids)
    test_mask[0, :5] = 0  # a left-padded row
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": test_ids.numpy(), "attention_mask": test_mask.numpy()})[0]
    with torch.no_grad():
        want = wrapper(test_ids, test_mask).numpy()
    attended = test_mask.numpy().astype(bool)
    diff = float(abs(got - want)[attended].max())
    return {"path": str(path), "bytes": _bytes(out, "*.onnx*"), "check_shape": list(test_ids.shape),
            "max_abs_diff": diff, "atol": atol, "ok": diff <= atol}
