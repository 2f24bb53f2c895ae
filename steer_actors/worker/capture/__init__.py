"""Worker-side activation capture: where rows live on the host (arena), how a step's rows get there (the
device writing mapped host pages, or a host copy), and the per-request books (store)."""
