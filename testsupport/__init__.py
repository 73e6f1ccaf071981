"""Test support: the process launcher and the fake OpenAI-compatible upstream that tests and
benchmarks use. It lives outside the product packages, so `pip install batchsvc` never ships it."""
