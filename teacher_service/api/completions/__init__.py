"""`POST /v1/completions` with `prompt_logprobs` and `POST /tokenize`, in vLLM's shapes."""
