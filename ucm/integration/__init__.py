"""Engine integrations (vLLM). The core (`ucm.sparse`, `ucm.ops`) knows nothing of them."""
