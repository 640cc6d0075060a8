#!/usr/bin/env bash
# Score a model served by `tpi master` with lm-evaluation-harness's local-completions backend
# on the local task in this directory (tpi_facts: 40 multiple-choice completions).
#   bash bench/lmeval/run.sh [tpi master flags...]        e.g.  --dtype int4
# Needs `lm_eval` on PATH (pip install lm_eval; its own venv is fine: LM_EVAL=/path/to/lm_eval)
# Prints lm_eval's table. The master's stdout goes to $LOG.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
PORT="${PORT:-18600}"
LOG="${LOG:-/tmp/tpi-lmeval-master.log}"
LM_EVAL="${LM_EVAL:-lm_eval}"
PY="${PY:-$repo/.venv/bin/python}"
"$PY" -m tpi_cli master --http "127.0.0.1:$PORT" "$@" >"$LOG" 2>&1 &
master=$!
trap 'kill $master 2>/dev/null; wait $master 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  kill -0 $master 2>/dev/null || { tail -20 "$LOG"; exit 1; }
  sleep 1
done
# the tokenizer lm_eval counts the context with: the model's directory (TOKENIZER=DIR for a --model DIR)
tokenizer="${TOKENIZER:-$("$PY" -c 'from tpi.weights.sources import resolve_model; print(resolve_model("smollm2"))')}"
model="$(curl -s "http://127.0.0.1:$PORT/v1/models" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
cd "$here"
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$LM_EVAL" --model local-completions \
  --model_args "model=$model,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer=$tokenizer,num_concurrent=1,max_retries=1" \
  --tasks tpi_facts --include_path "$here" --batch_size 1
