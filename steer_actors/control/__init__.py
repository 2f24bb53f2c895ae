"""The control plane: the coordinator that owns an app's global steering state (RW lock, spec stack,
version, fingerprint), its replicas, and the state it keeps in Ray's GCS."""
