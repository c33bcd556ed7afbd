"""The torch model side of the engine: config, weights, forward pass, KV pool, runner."""
