"""The llm step: jobs, responders, detokenising, sampling, the backends (engine, generate())."""
