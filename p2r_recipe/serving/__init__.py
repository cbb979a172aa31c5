"""p2r-serve, along vLLM's seam: `schema` and `protocol` (requests in, errors out), `batcher` (micro-batching),
`budget` (decoded pixels in flight), `app` (HTTP and CLI). See README.md here."""
