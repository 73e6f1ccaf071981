"""Developer tools: helpers for tests, benchmarks and local runs; never used in production paths."""
