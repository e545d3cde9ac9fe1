"""The vision_encoder step: batched tower forward, embedding cache."""
