"""Real parts built offline for tests and benchmarks: a tiny random LLaVA-NeXT saved
with ``save_pretrained``, and an OpenAI-compatible server on localhost that records
requests and injects faults."""
