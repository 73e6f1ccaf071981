"""batchsvc: a self-hostable Batch + Files API for LLM chat completions."""
