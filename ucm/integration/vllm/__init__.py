"""ucm inside vLLM: a general plugin that wraps the stock attention backends, and UCMConnector,
the KV connector that carries ucm's config (`kv_connector_extra_config`) and per-step state."""
