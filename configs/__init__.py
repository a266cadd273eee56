"""Per-model sparse configs (JSON), shipped with the package as `ucm.model_configs`."""
