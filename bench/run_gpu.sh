#!/usr/bin/env bash
# The GPU benchmarks: capture, steered generation, decode attention and decode GEMMs for the OLMo-2-7B and Qwen3-4B shapes,
# role transcripts + role capture for OLMo-2-7B, LoRA SFT for Qwen3-4B, each side by side with its reference.
# Logs and the final JSON lines go to ${OUT:-/tmp/persona-ops-bench}.
set -u
OUT=${OUT:-/tmp/persona-ops-bench}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then  # the packages the GPU image lacks (bench/gpu_wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
  'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; } \
  2>&1 | tee "$OUT/env.txt"
: >> "$OUT/results.jsonl"
run() {  # name, args...
  local name=$1; shift
  echo "=== $name $*"
  timeout "${BENCH_TIMEOUT:-330}" python3 -m "$@" 2>&1 | grep -v "Loading weights" | tee "$OUT/$name.log"
  tail -n 1 "$OUT/$name.log" | grep '^{' >> "$OUT/results.jsonl" || echo "!! $name produced no JSON"
}
# which groups to run (default all; one device call is capped at 10 minutes, so split them):
#   bash bench/run_gpu.sh generate capture  /  bash bench/run_gpu.sh transcripts  /  bash bench/run_gpu.sh train
# The GPU image lacks pydantic (every group), the server's packages (serve) and dask (fanout): make them with
# `bash bench/gpu_wheels.sh .whl` here and run with WHEELS=.whl; train needs trl and datasets, installed first.
# fanout runs one Dask worker per entry of FANOUT_WORKERS (default 0,1: one per GPU; 0,0: two sharing GPU 0).
for group in ${*:-generate capture transcripts train serve fanout}; do
  case $group in
    generate)
      run generate-qwen3 bench.generate --device cuda --model-shape qwen3-4b --rounds 2 --ref-rounds 1
      run generate-olmo2 bench.generate --device cuda --model-shape olmo2-7b --rounds 2 --ref-rounds 1 --sweep 4 --profile
      run attention-olmo2 bench.decode_attention --device cuda --model-shape olmo2-7b
      run attention-qwen3 bench.decode_attention --device cuda --model-shape qwen3-4b
      run gemm-olmo2 bench.decode_gemm --device cuda --model-shape olmo2-7b
      run gemm-qwen3 bench.decode_gemm --device cuda --model-shape qwen3-4b ;;
    capture)
      run capture-olmo2 bench.capture --device cuda --model-shape olmo2-7b --rounds 2 --ref-rounds 1
      run capture-qwen3 bench.capture --device cuda --model-shape qwen3-4b --rounds 2 --ref-rounds 1 ;;
    transcripts)
      run transcripts-olmo2 bench.transcripts --device cuda --model-shape olmo2-7b --ref-conversations 2 ;;
    train)
      run train-lora-qwen3 bench.train_lora --device cuda ;;
    serve)
      run serve-olmo2 bench.serve --device cuda --model-shape olmo2-7b
      run serve-qwen3 bench.serve --device cuda --model-shape qwen3-4b ;;
    fanout)
      run fanout-olmo2 bench.fanout --device cuda --model-shape olmo2-7b --workers "${FANOUT_WORKERS:-0,1}" ;;
    *) echo "unknown group: $group (generate, capture, transcripts, train, serve, fanout)"; exit 2 ;;
  esac
done
python3 - "$OUT/results.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keys = [k for k in r if "speedup" in k or k.endswith("tokens_per_s") or "peak" in k or k in
            ("steering_cost_pct", "coef0_identical_to_unsteered", "greedy_check", "engine_stats", "variant",
             "compile", "sweep", "one_worker", "fan_out")]
    print(r["bench"], r["model_shape"], {k: r[k] for k in keys})
EOF
