"""Inference: the generation engine, sampling, backends (hf, vLLM, OpenAI-compatible) and the server."""
