"""`ucm.integration.vllm.ucm_connector.UCMConnector`: the module path under which vllm-ascend
(and possibly other vLLM builds) register a connector named "UCMConnector". It is ucm's
connector (`ucm.integration.vllm.connector`), so `kv_connector="UCMConnector"` works there
without `kv_connector_module_path`. Passing `kv_connector_module_path=
"ucm.integration.vllm.connector"` remains the portable spelling (vLLM 0.32 registers no
"UCMConnector", and it is what ucm's checks look for)."""

from ucm.integration.vllm.connector import UCMConnector, UCMConnectorMetadata

__all__ = ["UCMConnector", "UCMConnectorMetadata"]
