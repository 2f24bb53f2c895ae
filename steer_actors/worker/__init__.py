"""What runs inside vLLM's worker processes: the plugin that patches decoder layers, the per-layer steerer,
the worker's shared runtime (:mod:`.runtime`), the worker extension and its side channel (:mod:`.channel`,
messages in :mod:`.protocol`), per-request routing, the global rows' double buffer, and activation capture
(:mod:`.capture`). Imported by vLLM workers; the engine actor imports only :mod:`.protocol` and the arena's
helpers."""
