"""The pure engine core: sequences, KV block manager, scheduler, sampler, step().

Nothing here does I/O; the engine process shell drives ``EngineCore.step()``.
"""
