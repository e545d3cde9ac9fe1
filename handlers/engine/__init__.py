"""Continuous-batching engine for the llm model (the nano-vllm shape).

``config``, ``sequence``, ``block_manager`` and ``scheduler`` are torch-free: the scheduler decides,
the model runner computes, the scheduler books the result.
"""
