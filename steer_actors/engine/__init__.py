"""The engine actor: one vLLM ``AsyncLLM`` per replica as a Ray actor, its launch, its end of the worker
channel, request-slot allocation, the capture registry in the object store, and the reaper of its processes."""
