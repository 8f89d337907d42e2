"""`GET /v1/models` (OpenAI/vLLM) and `GET /v1/info` (the handshake)."""
