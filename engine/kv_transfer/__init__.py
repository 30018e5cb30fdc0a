"""KV transfer between a prefill worker and a decode worker: the typed wire messages, the
channel that carries them, and the two roles that drive it (`KVSender` on prefill workers,
`KVReceiver` on decode workers). Workers use the engine's reserve / block_ids / admit API;
nothing here reaches into the engine's scheduler or pool."""
