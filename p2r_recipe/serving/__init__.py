"""p2r-serve, along vLLM's seam: `protocol` (requests in, errors out), `batcher` (micro-batching), `app` (HTTP and CLI)."""
