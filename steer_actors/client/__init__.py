"""The researcher's side: ``VLLMSteerModel`` (embedded or connected) and capture handles."""
