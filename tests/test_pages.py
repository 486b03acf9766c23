"""pages.small_pages: NumPy's huge-page switch is off inside any open block and back as it
was found once the last block closes, however blocks nest or interleave across threads."""

from __future__ import annotations

import threading

import pytest

from settle_arrow import pages


class _Switch:
    """Stands in for NumPy's setter: returns the previous value, as NumPy's does."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __call__(self, on: bool) -> bool:
        before, self.on = self.on, on
        return before


@pytest.mark.parametrize("on", [True, False])
def test_off_inside_restored_after_even_on_error(monkeypatch, on):
    switch = _Switch(on)
    monkeypatch.setattr(pages, "_setter", lambda: switch)
    with pages.small_pages():
        assert switch.on is False
        with pages.small_pages():
            assert switch.on is False
        assert switch.on is False  # an inner block leaves it off for the outer one
    assert switch.on is on
    with pytest.raises(RuntimeError), pages.small_pages():
        raise RuntimeError("a failed start-up")
    assert switch.on is on


def test_interleaved_threads_restore_once_the_last_leaves(monkeypatch):
    """A enters, B enters, A leaves (B still inside: off), B leaves (restored)."""
    switch = _Switch(True)
    monkeypatch.setattr(pages, "_setter", lambda: switch)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def a() -> None:
        with pages.small_pages():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with pages.small_pages():
            b_in.set()
            a_out.wait(5)
            seen.append(switch.on)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [False] and switch.on is True


def test_numpy_switch_restored():
    """With NumPy's own setter (where it has one): the switch ends as it started."""
    setter = pages._setter()
    if setter is None:
        pytest.skip("this NumPy has no huge-page switch")
    before = setter(True)
    try:
        with pages.small_pages():
            assert setter(False) is False  # off inside (reading it sets it, to the same)
        assert setter(True) is True
    finally:
        setter(before)


def test_no_switch_is_a_no_op(monkeypatch):
    monkeypatch.setattr(pages, "_setter", lambda: None)
    with pages.small_pages():
        pass
