"""StopMatcher: stop strings over streamed deltas, with partial-match holdback."""

from __future__ import annotations

from workers.stops import StopMatcher


def run(stops: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    """Feed every delta (until a stop) and flush; return the emitted pieces and whether a stop hit."""
    m = StopMatcher(stops)
    out: list[str] = []
    for d in deltas:
        text, stopped = m.feed(d)
        out.append(text)
        if stopped:
            return out, True
    out.append(m.flush())
    return out, False


def test_no_stops_passes_text_through_at_once():
    m = StopMatcher([])
    assert m.feed("hello") == ("hello", False)
    assert m.flush() == ""


def test_stop_split_across_deltas_is_never_emitted():
    out, stopped = run(["STOP"], ["hello S", "T", "OP and more"])
    assert stopped
    assert out == ["hello ", "", ""]
    assert "".join(out) == "hello "


def test_false_partial_match_is_released_later():
    m = StopMatcher(["STOP"])
    assert m.feed("a ST") == ("a ", False)  # "ST" may start a stop: held
    assert m.feed("ONE") == ("STONE", False)  # it did not: released with what follows
    assert m.feed(" S") == (" ", False)
    assert m.flush() == "S"  # generation ended: the held tail is released


def test_first_of_several_stops_wins():
    out, stopped = run(["world", "lo w"], ["hel", "lo wor", "ld"])
    assert stopped
    assert "".join(out) == "hel"


def test_stop_at_the_very_start():
    m = StopMatcher(["\n"])
    assert m.feed("\nanything") == ("", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_text_after_a_stop_in_the_same_delta_is_dropped():
    out, stopped = run(["."], ["one. two. three"])
    assert (out, stopped) == (["one"], True)


def test_holdback_uses_the_longest_possible_prefix():
    m = StopMatcher(["abc", "bcd"])
    assert m.feed("xab") == ("x", False)  # "ab" could start "abc"
    assert m.feed("cd") == ("", True)  # "abc" completes first, at the held text


def test_unicode_stops():
    out, stopped = run(["🙂"], ["héllo ", "wörld 🙂 bye"])
    assert stopped and "".join(out) == "héllo wörld "
