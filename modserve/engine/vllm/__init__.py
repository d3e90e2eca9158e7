"""The vLLM backend: `engine` (lifecycle, streaming, swaps), `policy` (language groups),
`conversion` (to and from vLLM's types) and `worker` (runs inside vLLM's workers)."""
