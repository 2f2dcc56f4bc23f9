#!/usr/bin/env bash
# One-GPU check of distill's GPU paths, with throughput figures; about 3-5 minutes with a ~0.5B model.
#
# Run as:  MODEL=/models/Qwen2.5-0.5B-Instruct bash benchmarks/gpu_check.sh
#     or:  bash benchmarks/gpu_check.sh /models/Qwen2.5-0.5B-Instruct
#          bash benchmarks/gpu_check.sh --dry-run MODEL   print the configs and commands, run nothing
#          bash benchmarks/gpu_check.sh --cpu MODEL       no GPU: hf backend, fp32, tiny sizes (checks the script)
#
# Stages, each through the `distill` CLI exactly as a user runs it:
#   1. teacher generation with the vLLM backend (greedy, top-k logprobs) into a store  -> tokens/s
#   2. offline distillation from that store: bf16 steps of a pruned student           -> tokens/s
#   3. online distillation: teacher and student side by side on the GPU, bf16 steps   -> tokens/s
# MODEL is a local Hugging Face model directory (nothing is downloaded). The only thing this script ever installs
# is `pip install -e ".[vllm]"`, and only when vLLM (or distill) is missing and NO_INSTALL is not set.
# Sizes: N_PROMPTS (256), NEW_TOKENS (128), TOP_K (20), STEPS (30), BATCH (8), MAX_LEN (512); WORK (a temp dir).
set -euo pipefail

DRY_RUN=0
CPU=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --cpu) CPU=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) MODEL="$1"; shift ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
MODEL="${MODEL:-}"
if [[ -z "$MODEL" || ! -f "$MODEL/config.json" ]]; then
  echo "error: give a local model directory (with config.json) as MODEL=... or the first argument; got '${MODEL}'" >&2
  exit 2
fi
MODEL="$(cd "$MODEL" && pwd)"
if [[ $CPU == 1 ]]; then
  N_PROMPTS="${N_PROMPTS:-8}"; NEW_TOKENS="${NEW_TOKENS:-8}"; TOP_K="${TOP_K:-4}"
  STEPS="${STEPS:-3}"; BATCH="${BATCH:-2}"; MAX_LEN="${MAX_LEN:-256}"
  BACKEND=hf; BF16=false
else
  N_PROMPTS="${N_PROMPTS:-256}"; NEW_TOKENS="${NEW_TOKENS:-128}"; TOP_K="${TOP_K:-20}"
  STEPS="${STEPS:-30}"; BATCH="${BATCH:-8}"; MAX_LEN="${MAX_LEN:-512}"
  BACKEND=vllm; BF16=true
fi
WORK="${WORK:-$(mktemp -d -t distill-gpu-check-XXXXXX)}"
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# ------------------------------------------------------------------ environment
if [[ $DRY_RUN == 0 ]]; then
  if [[ $CPU == 0 ]]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    if ! "$PYTHON" -c "import vllm, distill" 2>/dev/null; then
      if [[ -n "${NO_INSTALL:-}" ]]; then
        echo "error: vLLM or distill is not importable and NO_INSTALL is set: pip install -e \"$REPO[vllm]\"" >&2
        exit 1
      fi
      echo "== installing distill with the vllm extra (vLLM or distill missing)"
      "$PYTHON" -m pip install -e "$REPO[vllm]"
    fi
    "$PYTHON" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("error: torch sees no CUDA GPU; use --cpu to check the script on CPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}")
EOF
  else
    "$PYTHON" -c "import distill" || { echo "error: distill is not importable: pip install -e $REPO" >&2; exit 1; }
  fi
fi

# ------------------------------------------------------------------ inputs: prompts and one config for every stage
"$PYTHON" - "$WORK" "$MODEL" "$N_PROMPTS" "$NEW_TOKENS" "$TOP_K" "$STEPS" "$BATCH" "$MAX_LEN" "$BACKEND" "$BF16" <<'EOF'
import json, random, sys
from pathlib import Path

work, model, n, new, top_k, steps, batch, max_len, backend, bf16 = sys.argv[1:]
work = Path(work)
rng = random.Random(0)
names = ["Tom", "Lily", "Ana", "Ravi", "Mei", "Omar"]
things = ["apples", "cards", "pens", "stamps", "marbles"]
with open(work / "prompts.jsonl", "w") as fh:
    for i in range(int(n)):
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        who, what = rng.choice(names), rng.choice(things)
        q = f"{who} has {a} {what} and gives away {b}. How many {what} are left? Explain step by step."
        fh.write(json.dumps({"prompt": q, "answer": str(a - b)}) + "\n")
layers = json.loads((Path(model) / "config.json").read_text()).get("num_hidden_layers", 2)
config = {
    "run_dir": str(work / "run"),
    "teacher": {"model": model, "backend": backend, "dtype": "auto", "gpu_memory_utilization": 0.6},
    "generate": {"input": str(work / "prompts.jsonl"), "max_new_tokens": int(new), "temperature": 0.0,
                 "top_k": int(top_k), "batch_size": 64},
    "student": {"init": "prune", "num_layers": max(1, layers // 2)},
    "train": {"max_steps": int(steps), "per_device_train_batch_size": int(batch), "max_length": int(max_len),
              "learning_rate": 1e-5, "logging_steps": max(1, int(steps) // 3), "save_steps": 100000,
              "resume": False, "losses": [{"name": "forward_kl", "weight": 0.9}, {"name": "cross_entropy", "weight": 0.1}],
              "args": {"bf16": bf16 == "true", "include_num_input_tokens_seen": "non_padding",
                       "dataloader_drop_last": True}},
}
(work / "config.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
from distill.config import load_config  # fail here, not after the teacher ran, on a config the schema refuses
load_config(work / "config.yaml")
EOF

run() {  # echo, then run unless --dry-run; stderr kept for the figures
  local log="$1"; shift
  echo "+ $*"
  if [[ $DRY_RUN == 0 ]]; then
    "$@" 2>&1 | tee "$WORK/$log"
  fi
}

START=$SECONDS
echo "== work dir: $WORK"
[[ $DRY_RUN == 1 ]] && { cat "$WORK/config.yaml"; echo; }

echo "== 1/3 teacher generation, backend=$BACKEND: $N_PROMPTS prompts x up to $NEW_TOKENS new tokens, top-$TOP_K"
run generate.log distill generate "$WORK/config.yaml"
echo "== 2/3 offline distillation from the store: $STEPS steps x batch $BATCH, bf16=$BF16"
run offline.log distill train "$WORK/config.yaml" train.signal=offline student.name=offline
echo "== 3/3 online distillation (teacher logits live on the device): $STEPS steps x batch $BATCH, bf16=$BF16"
run online.log distill train "$WORK/config.yaml" train.signal=online student.name=online

[[ $DRY_RUN == 1 ]] && exit 0

# ------------------------------------------------------------------ figures
"$PYTHON" - "$WORK" "$MODEL" "$((SECONDS - START))" "$BACKEND" <<'EOF'
import json, re, sys
from pathlib import Path

work, model, wall, backend = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
gen = re.search(r"generated (\d+) rows, (\d+) tokens in ([\d.]+)s \(([\d,]+) tokens/s\)",
                (work / "generate.log").read_text())
print(f"\n== distill GPU check: {model}")
if gen:
    rows, tokens, secs, rate = gen.groups()
    print(f"teacher generation ({backend:<4})  {int(rows):>6} rows  {int(tokens):>9,} tokens  {float(secs):7.1f} s  "
          f"{rate:>10} tokens/s")
else:
    print("teacher generation: no figures found in generate.log (all rows already in the store?)")
precision = "bf16" if json.loads((work / "config.yaml").read_text())["train"]["args"]["bf16"] else "fp32"
for name in ("offline", "online"):
    out = work / "run" / "students" / name
    log = json.loads((out / "train_log.json").read_text())
    steps = json.loads((out / "train_summary.json").read_text())["global_steps"]
    tokens = max(e.get("num_input_tokens_seen", 0) for e in log)  # non-padding tokens through the student
    secs = log[-1]["train_runtime"]
    losses = [e["loss"] for e in log if "loss" in e]
    print(f"train {name:<7} {precision}  {steps:>6} steps {tokens:>9,} tokens  {secs:7.1f} s  "
          f"{tokens / secs:>10,.0f} tokens/s   loss {losses[0]:.3f} -> {losses[-1]:.3f}")
print(f"total wall time {wall} s")
EOF
