"""Ctrl-C and SIGTERM held while native code may call back into Python (torch's start-up), then raised as usual."""

from __future__ import annotations

import os
import signal

import pytest

from apo_merge import shell


@pytest.fixture
def handlers():
    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, shell._on_int)
    signal.signal(signal.SIGTERM, shell._on_term)
    yield
    signal.signal(signal.SIGINT, old[0])
    signal.signal(signal.SIGTERM, old[1])


@pytest.mark.parametrize("sig,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, shell.Terminated)])
def test_a_signal_inside_the_hold_is_raised_when_it_ends(handlers, sig, raised):
    reached_end = []
    with pytest.raises(raised), shell.hold_signals():
        os.kill(os.getpid(), sig)
        for _ in range(1000):  # the handler runs at the next bytecode boundaries: it must not raise here
            pass
        reached_end.append(True)
    assert reached_end == [True]
    with shell.hold_signals():  # the held signal is spent: a new hold starts clean
        pass


def test_the_last_signal_wins_and_nested_holds_end_with_the_outer_one(handlers):
    with pytest.raises(shell.Terminated), shell.hold_signals():
        with shell.hold_signals():
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass


def test_without_a_hold_the_handlers_raise_at_once(handlers):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10**7):
            pass


def test_torch_is_imported_under_the_hold(monkeypatch):
    seen = []
    real = shell.hold_signals

    def spy():
        seen.append(True)
        return real()

    monkeypatch.setattr(shell, "hold_signals", spy)
    torch = shell.import_torch()
    assert seen == [True] and torch.__name__ == "torch"
