"""The preprocess step: request tensors -> input ids, pixel values, request options."""
