#!/usr/bin/env bash
# The GPU checks of issue 9, for a lent CUDA machine that has torch but not our venv:
#   bash scripts/gpu_probes.sh OUT_DIR STEP[:LIMIT_S] ...
# steps: env, gputest, and for a MODEL (vanilla, mor_expert, ...):
#   eager-MODEL: the paper's decode protocol without torch.compile, 256 requests (quick numbers)
#   paper-MODEL: the paper's decode protocol as configured: bf16, torch.compile, 1000 requests
#   graphs-MODEL: the same with the eager layers replayed as CUDA graphs (bench.cuda_graphs)
#   train-MODEL: training step, bf16 autocast, 8 x 2048 tokens: tokens/s and MFU
#   profile-MODEL, cprofile-MODEL: scripts/profile_decode.py, eager / compiled, batch 32
#     (PROFILE_ARGS: more of its options, e.g. --fuse)
# SIZE (default 360m) and EXTRA (more overrides for every probe) shrink it for a CPU smoke run.
# Pure-Python packages missing there go on PYTHONPATH, e.g. copied from our venv:
#   mkdir -p .gpu_site && cp -r .venv/lib/python3.*/site-packages/{hydra,omegaconf,antlr4,hydra_plugins,submitit} .gpu_site/
# Each step has its own time limit (default 120 s), so a failure or a hang costs only its step;
# every row is appended to OUT_DIR/bench-STEP.jsonl as it is measured, every log to OUT_DIR/log.txt.
# Results and what they showed: results/gpu/.
set -u
out=${1:?usage: gpu_probes.sh OUT_DIR STEP[:LIMIT_S] ...}
shift
mkdir -p "$out"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
log="$out/log.txt"

export py
bench() {  # bench DIR OVERRIDES...: one mor-bench whose run directories go under DIR
  "$py" -m harness.main stages=[bench] results_root="$1" hydra.run.dir="$1/.hydra" \
    size="${SIZE:-360m}" "${@:2}" ${EXTRA:-}
}
export -f bench

for arg in "$@"; do  # every step name checked before any work
  [[ ${arg%%:*} =~ ^(env|gputest|(eager|paper|graphs|train|profile|cprofile)-[a-z_]+)$ ]] ||
    { echo "unknown step ${arg%%:*}: allowed env, gputest, eager-, paper-, graphs-, train-, profile-, cprofile-MODEL" >&2 && exit 2; }
done
for arg in "$@"; do
  name=${arg%%:*} limit=120 dir=$(mktemp -d)
  [[ $arg == *:* ]] && limit=${arg#*:}
  case $name in
  env) cmd=(bash -c "nvidia-smi; $py -c 'import torch, sys; print(sys.version, torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(0))'") ;;
  gputest) cmd=("$py" -m pytest -v -p no:cacheprovider -m gpu tests/test_engine.py) ;;
  eager-*) cmd=(bash -c 'bench "$@"' - "$dir" "model=${name#*-}" bench=paper bench.compile=false bench.num_requests=256 \
    bench.warmup=20) ;;
  profile-*) cmd=("$py" scripts/profile_decode.py --size "${SIZE:-360m}" --model "${name#*-}" ${PROFILE_ARGS:-}) ;;
  cprofile-*) cmd=("$py" scripts/profile_decode.py --size "${SIZE:-360m}" --model "${name#*-}" --compile ${PROFILE_ARGS:-}) ;;
  paper-*) cmd=(bash -c 'bench "$@"' - "$dir" "model=${name#*-}" bench=paper) ;;
  graphs-*) cmd=(bash -c 'bench "$@"' - "$dir" "model=${name#*-}" bench=paper bench.compile=false \
    bench.cuda_graphs=true) ;;
  train-*) cmd=(bash -c 'bench "$@"' - "$dir" "model=${name#*-}" bench=train bench.dtype=bf16 data.seq_len=2048 \
    train.micro_batch_size=8) ;;
  esac
  echo "=== $name ($(date -u +%T), limit $limit s)" | tee -a "$log"
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "${cmd[@]}" >>"$log" 2>&1
  rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$log"
  rows=$(find "$dir" -name bench.jsonl)
  [[ -n $rows ]] && cat $rows >>"$out/bench-$name.jsonl"
done
grep -h "^=== .* rc=" "$log"
