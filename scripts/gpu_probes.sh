#!/usr/bin/env bash
# The GPU checks of issue 9 in one go, for a lent CUDA machine that has torch but not our venv:
#   bash scripts/gpu_probes.sh OUT_DIR [STEP ...]     (steps: env gputest eager paper train; default: all)
# SIZE (default 360m) and EXTRA (more overrides for every probe) shrink it for a CPU smoke run.
# PYTHONPATH may point at extra pure-Python packages (hydra-core, omegaconf, antlr4) where they are
# missing. Each step has its own time limit, so one failure or hang costs only its step; every row
# is appended to OUT_DIR/bench-*.jsonl as it is measured, every log to OUT_DIR/log.txt.
set -u
out=${1:?usage: gpu_probes.sh OUT_DIR [STEP ...]}
shift
steps=${*:-env gputest eager paper train}
mkdir -p "$out"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
root=$(mktemp -d)
log="$out/log.txt"
export py root out

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log, and report its exit code
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name ($(date -u +%T))" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$log"
}

bench() {  # bench TAG OVERRIDES...: one mor-bench invocation whose rows land in $out/bench-TAG.jsonl
  local tag=$1 dir
  shift
  dir=$(mktemp -d -p "$root")
  "$py" -m harness.main stages=[bench] results_root="$dir" hydra.run.dir="$dir/.hydra" size="${SIZE:-360m}" "$@" ${EXTRA:-} &&
    find "$dir" -name bench.jsonl -exec cat {} + >>"$out/bench-$tag.jsonl"
}
export -f bench

for s in $steps; do
  case $s in
  env)
    step env 30 bash -c "nvidia-smi; $py -c 'import torch, sys; print(sys.version, torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(0))'; git log -1 --format=%H 2>/dev/null"
    ;;
  gputest) # the engine's tokens on CUDA, eager and compiled, equal the model's cached decoding
    step gputest 140 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py
    ;;
  eager) # the paper's protocol without torch.compile, 256 requests: quick numbers first
    for m in vanilla mor_expert; do
      step "eager-$m" 110 bash -c 'bench "$@"' - eager "model=$m" bench=paper bench.compile=false \
        bench.num_requests=256 bench.warmup=20
    done
    ;;
  paper) # the paper's protocol as configured: bf16, torch.compile, 1000 requests, B=32 and max batch
    for m in vanilla mor_expert; do
      step "paper-$m" 280 bash -c 'bench "$@"' - paper "model=$m" bench=paper
    done
    ;;
  train) # training step at 360m, bf16 autocast, 8 x 2048 tokens: tokens/s and MFU
    for m in vanilla mor_expert; do
      step "train-$m" 80 bash -c 'bench "$@"' - train "model=$m" bench=train bench.dtype=bf16 \
        data.seq_len=2048 train.micro_batch_size=8
    done
    ;;
  *) echo "unknown step $s: allowed env gputest eager paper train" >&2 && exit 2 ;;
  esac
done
grep -h "^=== .* rc=" "$log"
