"""What runs inside vLLM's worker processes: the plugin that patches decoder layers, the per-layer steerer,
the worker extension and its side channel, per-request routing, the global rows' double buffer, and
activation capture (:mod:`.capture`). Imported by vLLM, never by clients."""
