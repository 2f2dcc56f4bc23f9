"""Peak CPU memory of a model generating a batch, measured in a separate process.

Why a separate process: in the evaluating process, RSS is distorted by memory the allocator kept from the
models evaluated before (and by the teacher that stays loaded). So one helper process imports torch and
transformers once (and the models' Python code), then forks a child per model. The child loads the model
once untimed and generates one token (one-time kernel setup and lazy imports are per-process overhead, not
memory the model needs), frees it, resets its peak-RSS mark (Linux VmHWM via /proc/self/clear_refs), loads
the model again and generates the batch. The figure is the peak RSS minus the RSS before that second load:
weights + activations + KV cache. Without fork (Windows) the models are probed one after another in the
helper process, which is less exact.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _preimport(spec: dict[str, Any]) -> None:
    """Import the model's modeling code in the helper so that forked children share it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from distill.evaluation.generation import is_adapter

    try:
        base = spec["path"]
        if is_adapter(base):
            base = json.loads((Path(base) / "adapter_config.json").read_text())["base_model_name_or_path"]
        MODEL_FOR_CAUSAL_LM_MAPPING[
            type(AutoConfig.from_pretrained(base, trust_remote_code=spec["trust_remote_code"]))
        ]
    except (OSError, ValueError, KeyError, ImportError):
        return  # best effort: the child's warm-up load imports it anyway


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS increase of loading spec['path'] and generating spec['new_tokens'] for spec['batch']."""
    import torch

    from distill.evaluation.generation import generate_ids, load_for_eval

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    args = (spec["path"], "cpu", spec["dtype"], spec["trust_remote_code"])
    model, tok = load_for_eval(*args)
    generate_ids(model, tok, spec["batch"][:1], 1, True)
    del model
    gc.collect()
    reset = _reset_peak_rss()
    before = _rss()
    model, tok = load_for_eval(*args)
    generate_ids(model, tok, spec["batch"], spec["new_tokens"], True)
    return {"peak_bytes": max(0, _peak_rss() - before), "hwm_reset": reset}


def _probe_forked(spec: dict[str, Any]) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report through the pipe, exit without running the parent's cleanup
        os.close(read_fd)
        try:
            out = probe(spec)
        except BaseException as exc:  # noqa: BLE001 - any failure is reported, the parent goes on
            out = {"error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(write_fd, "w") as fh:
            fh.write(json.dumps(out))
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": "the measuring process died (out of memory?)"}


def _main() -> None:
    """Helper process entry: a JSON list of specs on stdin, a JSON list of results as the last stdout line."""
    specs = json.loads(sys.stdin.read())
    # torch, transformers and our loaders, imported once for all children
    import distill.evaluation.generation  # noqa: F401

    for spec in specs:
        _preimport(spec)
    results = [_probe_forked(s) if hasattr(os, "fork") else probe(s) for s in specs]
    print(json.dumps(results))


def measure_cpu(specs: list[dict[str, Any]], threads: int | None = None) -> list[tuple[int | None, str]]:
    """(peak bytes or None, how it was measured) per spec: {path, dtype, trust_remote_code, batch (token id
    lists), new_tokens, threads}."""
    if not specs:
        return []
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", "from distill.evaluation.peak_memory import _main; _main()"]
    proc = subprocess.run(cmd, input=json.dumps(specs), capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [(None, f"memory measurement failed: {tail}")] * len(specs)
    out = []
    for result in json.loads(proc.stdout.strip().splitlines()[-1]):
        if "error" in result:
            out.append((None, f"memory measurement failed: {result['error']}"))
            continue
        how = "VmHWM" if result["hwm_reset"] else "peak RSS (mark not reset)"
        how = f"cpu: {how} increase loading the model and generating the throughput batch, in a separate process"
        out.append((result["peak_bytes"], how))
    return out
