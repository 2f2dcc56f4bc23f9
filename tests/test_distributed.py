"""Multi-process runs on CPU (gloo) through the real launcher: `torchrun --nproc_per_node 2 -m distill.cli ...`.

- training: 2 processes x (batch 1, accumulation 2) take two SGD steps (lr=1) on the same 4 examples as one
  process with batch 4, and must give the same losses, gradient norms, loss components and weights. The rows
  have very different lengths, so any split over ranks is uneven: normalising per rank or per micro-batch
  instead of by the global token count (or forgetting that DDP averages gradients) makes the results differ.
  A hidden-state loss with learned projections (outside the DDP-wrapped student) is part of the objective:
  its projections must stay in sync over ranks for the second step to match.
- the 2-process run writes exactly one student (rank 0 writes, the others wait);
- generation: 2 processes (RANK/WORLD_SIZE from torchrun) write disjoint shards of one store that reads back as
  one row per prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from distill.config import load_config
from distill.store.shards import read_store, shard_files

# one long row and three short ones: whichever way the 4 rows are dealt to 2 ranks, token counts differ a lot
ROWS = [
    {
        "text": "Q: Lily has 43 cards. She finds 19 more. How many cards now? A: 43 + 19 = 62. The answer is 62. "
        "Q: Tom has 12 apples. He eats 5. How many apples now? A: 12 - 5 = 7. The answer is 7."
    },
    {"text": "Hi."},
    {"text": "The dog."},
    {"text": "A fox."},
]


def launch(nproc: int, args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m distill.cli ARGS` with one thread per process."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "distill.cli",
        *args,
    ]
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def sgd_config(tmp_path: Path, teacher_dir, data: Path, run: str, batch: int, accum: int):
    """Plain SGD steps with lr=1: each weight change is exactly minus the gradient."""
    return load_config(
        {
            "run_dir": str(tmp_path / run),
            "teacher": {"model": str(teacher_dir)},
            "student": {
                "init": "config",
                "config": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 4,
                },
            },
            "train": {
                "input": str(data),
                "signal": "online",
                "max_steps": 2,
                "learning_rate": 1.0,
                "lr_scheduler_type": "constant",
                "per_device_train_batch_size": batch,
                "gradient_accumulation_steps": accum,
                "logging_steps": 1,
                "save_steps": 1000,
                "losses": [
                    {"name": "forward_kl", "weight": 0.6},
                    {"name": "cross_entropy", "weight": 0.2},
                    # student width 32, teacher 64: learned projections
                    {"name": "hidden_mse", "weight": 0.2},
                ],
                # a huge clip threshold: the gradient norm is computed and logged but never clips
                "args": {"optim": "sgd", "max_grad_norm": 1e9, "data_seed": 0},
            },
        }
    )


def step_logs(out: Path) -> list[dict]:
    return [e for e in json.loads((out / "train_log.json").read_text()) if "loss" in e]


def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, teacher_dir):
    from distill.modeling import load_model
    from distill.training.train import train

    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    (single,) = train(sgd_config(tmp_path, teacher_dir, data, "one", batch=4, accum=1))

    cfg = sgd_config(tmp_path, teacher_dir, data, "two", batch=1, accum=2)
    cfg_file = tmp_path / "two.yaml"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    proc = launch(2, ["train", str(cfg_file)], cwd=tmp_path)
    assert proc.stderr.count("student written") == 2  # the CLI returns on every rank after the barrier

    # exactly one student: the files rank 0 writes, nothing else, no second copy
    students = tmp_path / "two" / "students"
    assert [p.name for p in students.iterdir()] == ["student"]
    double = students / "student"
    assert {"model.safetensors", "config.json", "tokenizer.json", "train_log.json", "train_summary.json"} <= {
        p.name for p in double.iterdir()
    }
    summary = json.loads((double / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_steps"] == 2 and summary["examples"] == len(ROWS)

    logs_one, logs_two = step_logs(single), step_logs(double)
    assert [e["step"] for e in logs_one] == [e["step"] for e in logs_two] == [1, 2]
    for one, two in zip(logs_one, logs_two):
        for key in ("loss", "grad_norm", "loss_forward_kl", "loss_cross_entropy", "loss_hidden_mse"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), (key, one, two)
        assert one["grad_norm"] > 0.1  # real steps: lr=1 moves every weight by its gradient
    assert summary["train_loss"] == pytest.approx(sum(e["loss"] for e in logs_one) / 2, rel=1e-4)

    a, b = load_model(single).state_dict(), load_model(double).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_two_generate_workers_write_disjoint_shards_of_one_store(tmp_path, teacher_dir, prompts_file):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(
        json.dumps(
            {
                "run_dir": str(tmp_path / "run"),
                "teacher": {"model": str(teacher_dir)},
                "generate": {"input": str(prompts_file), "max_new_tokens": 3, "top_k": 2, "shard_rows": 2},
            }
        )
    )
    launch(2, ["generate", str(cfg)], cwd=tmp_path)  # worker = RANK of WORLD_SIZE, set by torchrun

    store = tmp_path / "run" / "teacher"
    keys = {
        w: [
            k
            for p in shard_files(store)
            if p.name.startswith(w)
            for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()
        ]
        for w in ("w000of002-", "w001of002-")
    }
    assert len(keys["w000of002-"]) == len(keys["w001of002-"]) == 4
    assert not set(keys["w000of002-"]) & set(keys["w001of002-"])
    assert {p.name.split("-")[0] for p in shard_files(store)} == {"w000of002", "w001of002"}
    assert {p.name for p in store.glob("manifest.*.json")} == {
        "manifest.w000of002.json",
        "manifest.w001of002.json",
    }

    rows = read_store(store)
    n_prompts = sum(1 for line in prompts_file.read_text().splitlines() if line.strip())
    assert [r["index"] for r in rows] == list(range(n_prompts))  # rows == prompts, each once, merged in order
    assert {r["index"] for r in rows if r["key"] in keys["w001of002-"]} == {1, 3, 5, 7}
    assert all(r["topk_ids"].shape == (len(r["response_ids"]), 2) for r in rows)


# ---------------------------------------------------------------- shipped configs for GPU clusters
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def resolved_launch(config: Path):
    """What `accelerate launch --config_file CONFIG -m distill.cli train cfg.yaml` resolves, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args, defaults, mp_from_config = _validate_launch_command(
        parser.parse_args(["--config_file", str(config), "-m", "distill.cli", "train", "cfg.yaml"])
    )
    return parser, args, defaults, mp_from_config


def test_accelerate_configs_resolve_to_ddp_fsdp_and_zero3(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    from conftest import make_llama

    for name in ("ddp", "fsdp", "deepspeed_zero3"):
        parser, args, defaults, _ = resolved_launch(EXAMPLES / "accelerate" / f"{name}.yaml")
        dests = {a.dest for a in parser._actions}  # accelerate sets unknown nested keys silently: catch typos
        unknown = [k for k in {**defaults.fsdp_config, **defaults.deepspeed_config} if k not in dests]
        assert not unknown, f"{name}.yaml: keys that `accelerate launch` does not know: {unknown}"
        assert args.mixed_precision == "bf16"
    _, ddp, _, _ = resolved_launch(EXAMPLES / "accelerate" / "ddp.yaml")
    assert ddp.multi_gpu and not ddp.use_fsdp and not ddp.use_deepspeed

    _, fsdp, _, _ = resolved_launch(EXAMPLES / "accelerate" / "fsdp.yaml")
    assert fsdp.use_fsdp
    for key, value in prepare_multi_gpu_env(fsdp).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what each launched process builds from that environment
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # save_model gathers one full checkpoint
    plugin.set_auto_wrap_policy(make_llama(64, hidden=16, layers=2))  # raises if the layer class is missing
    (layer_cls,) = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    assert layer_cls.__name__ == "LlamaDecoderLayer"

    _, ds, defaults, mp_from_config = resolved_launch(EXAMPLES / "accelerate" / "deepspeed_zero3.yaml")
    assert ds.use_deepspeed
    ds.deepspeed_fields_from_accelerate_config = ",".join(
        [*defaults.deepspeed_config, *(["mixed_precision"] if mp_from_config else [])]
    )
    _, env = prepare_deepspeed_cmd_env(ds)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    # batch size, accumulation and clipping stay "auto": the Trainer fills them from train.* settings
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and "ACCELERATE_GRADIENT_CLIPPING" not in env


def test_cluster_recipe_is_a_valid_config():
    cfg = load_config(EXAMPLES / "cluster_offline.yaml")
    assert cfg.teacher.backend == "vllm" and cfg.teacher.tensor_parallel_size > 1
    assert cfg.train.signal == "offline" and cfg.generate.top_k > 0  # no teacher in the training job
    assert cfg.train.args["bf16"] is True
