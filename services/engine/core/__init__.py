"""The pure engine core: sequences, KV block manager, scheduler, sampler, step().

Nothing here does I/O; the engine service (services/engine/service.py) drives ``EngineCore.step()``.
"""
