#!/usr/bin/env bash
# One device session's GPU runs, in phases that each fit one `run` call (10 minutes). Each phase
# writes under $HOME/res/PHASE and packs it into $OUT/PHASE.tgz (a call returns at most 8
# files), also when a step fails or runs out of time, so what was measured always comes back.
#
#   source $HOME/stage/device_setup.sh && bash benchmarks/gpu_session.sh PHASE
#
# Phases (in this order; `tune` first: the benches run with its launch settings, else with the
# shipped file of this GPU model, backends/cuda/tuned/, else the built-in ones):
#   tune   the CUDA conformance subset, then the grouped scorer's launch search
#          (tune_selection_gpu.py --grouped-only --write-tuned): $HOME/tuned/<GPU>.json, which
#          the later phases use through UCM_CUDA_TUNED_DIR; commit it to backends/cuda/tuned/
#   32k    plain vLLM (first and last) vs ESA, GSA, GSA on device, KVStar at 32K, batch 1 and 8, 0.3
#   32kx   plain vLLM vs ESA at 0.1 and 0.999 (the overhead cell) and Quest (its bf16 bounds of
#          groups of 4 are a quarter of the KV cache's bytes: vLLM gets 0.7 of an H200, 0.75 of an
#          80 GiB card) at 32K x 8
#   128k   plain vLLM vs ESA (scored every step, and every 5 steps: retrieval_stride 5) and GSA on
#          device at 128K x 4, ratios 0.3 and 0.1
#   stride plain vLLM vs ESA scored every step and every 5 steps at 32K x 8: 0.3, 0.1 and 0.999
#          (the overhead cell)
#   32b    plain vLLM vs ESA and GSA on device (its built-in Qwen3-32B JSON) at 32K x 4, ratio 0.3,
#          on the Qwen3-32B shape (65.5 GB of dummy weights: an H200 only)
#   tests  tests/test_vllm_gpu.py (the in-engine GPU tests: 440-610 s on an H100, so a call of its
#          own after the staging calls, not inside the last of them, or two: TESTS_K="expr" runs
#          pytest's -k selection, e.g. TESTS_K="not graphs" then TESTS_K=graphs)
#   topk   the top-k + table rewrite against an earlier commit's kernel (topk_compare_gpu.py), then
#          the CUDA top-k conformance cases; first, here: git show fcaab27:backends/cuda/kernels.py
#          > .baseline_kernels.py (an untracked file travels with the checkout; delete it after)
#   hash   the CUDA cases of the hash scorers (Hamming, norm_cosine) and the centred key writes, then
#          bench_hash_scorers_gpu.py (both scorers and both writes at 32K x 8 and 128K x 4)
# A bench phase's --batches / --settings can be narrowed for a short session, and LIMIT (seconds,
# default 570) shortens its time limit where the call also stages vLLM:
#   BATCHES="8" SETTINGS="dense ESA:0.3" LIMIT=500 bash benchmarks/gpu_session.sh 32k
# (PROFILE=STEPS profiles the 128k phase's engines too; the 32k phase always profiles 16 steps.)
# Merge the benches' JSON into benchmarks/results/vllm_gpu_decode.json with
# `bench_vllm_gpu.py --merge` here afterwards.
set -uo pipefail
PHASE=${1:?usage: gpu_session.sh tune|32k|32kx|stride|128k|32b|tests|topk|hash}
R=$HOME/res/$PHASE
mkdir -p "$R" "$HOME/tuned"
export PYTHONUNBUFFERED=1 UCM_CUDA_TUNED_DIR=$HOME/tuned
pack() { tar czf "${OUT:-$HOME}/$PHASE.tgz" -C "$HOME/res" "$PHASE"; }
trap pack EXIT
# UCM_COMMIT=<sha>: the commit whose files the call carries (the device copy's git metadata can lag)
echo "${UCM_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}" > "$R/commit.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$R/gpu.txt"
case $PHASE in
  tune)
    timeout 180 python -m pytest -q -n 8 -p no:cacheprovider tests/test_ops_conformance.py tests/test_subblocks.py \
      tests/test_cuda_tuned.py -k "cuda and (scores or sums or reps or mean or quest or grouped)" \
      > "$R/cuda_conformance.txt" 2>&1
    tail -2 "$R/cuda_conformance.txt"
    timeout 380 python benchmarks/tune_selection_gpu.py --grouped-only --out "$R" --write-tuned "$HOME/tuned" \
      > "$R/tune.log" 2>&1
    tail -2 "$R/tune.log"
    cp "$HOME"/tuned/*.json "$R/" 2>/dev/null && cat "$HOME"/tuned/*.json
    ;;
  32k)
    timeout ${LIMIT:-570} python benchmarks/bench_vllm_gpu.py --contexts 32768 --batches ${BATCHES:-1 8} --new-tokens 48 --dense-again \
      --profile 16 --gpu-memory-utilization 0.7 --out "$R" --name vllm_gpu_32k \
      --settings ${SETTINGS:-dense ESA:0.3 GSA:0.3 GSAOnDevice:0.3 KVStarMultiStep:0.3} > "$R/bench.log" 2>&1
    grep -E "^\[" "$R/bench.log"
    ;;
  32kx)
    # 8 x 32K of KV plus Quest's bounds (a quarter of it) in 0.7 of an H200 (139 GiB); an 80 GiB
    # card needs 0.75 for the KV (below, its engines preempt and the timings mean nothing: seen
    # on an H100 at 0.55) and leaves the bounds the rest
    MEM=$(awk -F', ' '{print ($2 + 0 > 100000) ? 0.7 : 0.75}' "$R/gpu.txt")
    timeout ${LIMIT:-570} python benchmarks/bench_vllm_gpu.py --contexts 32768 --batches ${BATCHES:-8} --new-tokens 48 \
      --gpu-memory-utilization "$MEM" --out "$R" --name vllm_gpu_32k_extra \
      --settings ${SETTINGS:-dense ESA:0.1 ESA:0.999 Quest:0.3} > "$R/bench.log" 2>&1
    grep -E "^\[" "$R/bench.log"
    ;;
  stride)
    timeout ${LIMIT:-570} python benchmarks/bench_vllm_gpu.py --contexts 32768 --batches ${BATCHES:-8} --new-tokens 48 --dense-again \
      --gpu-memory-utilization 0.7 --out "$R" --name vllm_gpu_32k_stride \
      --settings ${SETTINGS:-dense ESA:0.3 ESA:0.3:retrieval_stride=5 ESA:0.1:retrieval_stride=5 ESA:0.999:retrieval_stride=5} \
      > "$R/bench.log" 2>&1
    grep -E "^\[" "$R/bench.log"
    ;;
  128k)
    timeout ${LIMIT:-570} python benchmarks/bench_vllm_gpu.py --contexts 131072 --batches ${BATCHES:-4} --new-tokens 24 ${PROFILE:+--profile $PROFILE} \
      --out "$R" --name vllm_gpu_128k \
      --settings ${SETTINGS:-dense ESA:0.3 ESA:0.3:retrieval_stride=5 ESA:0.1:retrieval_stride=5 GSAOnDevice:0.3} \
      > "$R/bench.log" 2>&1
    grep -E "^\[" "$R/bench.log"
    ;;
  32b)
    timeout ${LIMIT:-570} python benchmarks/bench_vllm_gpu.py --model qwen3-32b --contexts 32768 --batches ${BATCHES:-4} \
      --new-tokens 32 --out "$R" --name vllm_gpu_32b --settings ${SETTINGS:-dense ESA:0.3 GSAOnDevice:0.3} \
      > "$R/bench.log" 2>&1
    grep -E "^\[" "$R/bench.log"
    ;;
  tests)
    # -v: a run cut by its limit still names the tests that passed (session 35's 560 s call ended
    # after 7 of 9 with -q's bare dots); --durations: what a split by TESTS_K should balance
    timeout ${LIMIT:-570} python -m pytest -x -v --durations=0 -p no:cacheprovider tests/test_vllm_gpu.py \
      ${TESTS_K:+-k "$TESTS_K"} > "$R/vllm_gpu_tests.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$R/vllm_gpu_tests.txt" | tail -12
    ;;
  topk)
    timeout 330 python benchmarks/topk_compare_gpu.py --baseline .baseline_kernels.py --baseline-name fcaab27 \
      --out "$R" > "$R/topk.log" 2>&1
    grep -E "^\{" "$R/topk.log" | head -40
    timeout 230 python -m pytest -q -p no:cacheprovider tests/test_ops_conformance.py -k "cuda and (topk or rewrite)" \
      > "$R/cuda_conformance.txt" 2>&1
    tail -2 "$R/cuda_conformance.txt"
    ;;
  hash)
    timeout 200 python -m pytest -q -n 8 -p no:cacheprovider tests/test_cuda_kernels.py tests/test_ops_conformance.py \
      -k "cuda and (cosine or norm_write or hash_write or hamming)" > "$R/cuda_conformance.txt" 2>&1
    tail -2 "$R/cuda_conformance.txt"
    timeout 300 python benchmarks/bench_hash_scorers_gpu.py --out "$R" > "$R/bench.log" 2>&1
    tail -8 "$R/bench.log"
    ;;
  *)
    echo "unknown phase $PHASE: tune|32k|32kx|stride|128k|32b|tests|topk|hash" >&2
    exit 2
    ;;
esac
