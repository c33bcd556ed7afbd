"""GrammarCompiler.wait_ready: the engine's start-up waits for the structured-output warm-up."""

from __future__ import annotations

import threading

from services.engine.structured import GrammarCompiler


def test_wait_ready_waits_for_both_the_tokenizer_and_the_warm_up() -> None:
    tokenizer_may_finish, warm_up_may_finish = threading.Event(), threading.Event()

    def tokenizer() -> object:
        tokenizer_may_finish.wait(10)
        return object()

    def warm_up() -> None:
        warm_up_may_finish.wait(10)

    compiler = GrammarCompiler(tokenizer, warm_up=warm_up)  # type: ignore[arg-type]
    try:
        assert not compiler.wait_ready(timeout=0.05)
        tokenizer_may_finish.set()
        assert not compiler.wait_ready(timeout=0.05)  # the warm-up still runs
        warm_up_may_finish.set()
        assert compiler.wait_ready(timeout=10)
    finally:
        tokenizer_may_finish.set()
        warm_up_may_finish.set()
        compiler.close()


def test_a_tokenizer_that_fails_to_load_does_not_stop_the_start_up() -> None:
    def tokenizer() -> object:
        raise OSError("no tokenizer.json")

    compiler = GrammarCompiler(tokenizer)  # type: ignore[arg-type]
    try:
        # Ready: each constrained request then gets the failure from compile(), the engine still serves.
        assert compiler.wait_ready(timeout=10)
    finally:
        compiler.close()
