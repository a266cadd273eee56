"""ESA with offload: after prefill, only the windows and the selected blocks stay on the device.

The rest of the request's KV goes to a POSIX store (a temporary directory here) and comes back
when a layer selects it. Prints the answer, the blocks read per layer and how many device blocks
the request held at most. Needs what the other examples need (see the README).
"""

import tempfile

from ucm.demo_vllm import run_offline

# a retrieval every 4 steps: with offload each changed selection is a load from the store, so
# offload trades some accuracy for fewer loads (the other examples retrieve every step; see
# docs/accuracy.md and docs/store.md)
UCM_SPARSE_CONFIG = {"ESA": {"sparse_ratio": 0.3, "retrieval_stride": 4, "offload": True, "offload_margin_blocks": 2}}

if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="ucm-kv-") as store:
        run_offline(UCM_SPARSE_CONFIG, max_tokens=24, store_dir=store)
