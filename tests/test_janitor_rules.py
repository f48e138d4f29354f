"""The janitor's decisions as pure rules: who counts as dead, and what becomes of each job a dead worker left."""

from __future__ import annotations

import pytest

from broker.janitor import Fate, confirm_dead, fate


def test_a_worker_is_dead_only_when_missing_on_two_sweeps_in_a_row():
    dead, suspects = confirm_dead({"a", "b"}, set())
    assert dead == set() and suspects == {"a", "b"}  # a paused Redis expires every record at once: not yet
    dead, suspects = confirm_dead({"a"}, suspects)  # b wrote its record again within a heartbeat
    assert dead == {"a"} and suspects == {"a"}
    dead, suspects = confirm_dead({"b"}, {"a"})  # missing once, after being back: a suspect again, not dead
    assert dead == set() and suspects == {"b"}


@pytest.mark.parametrize("running,expired,waited_for,expected", [
    (True, False, True, Fate.LOST),     # running: its gateway decides, whatever else holds
    (True, True, False, Fate.LOST),
    (False, True, True, Fate.DROP),     # never started, deadline passed
    (False, False, False, Fate.DROP),   # never started, its gateway is gone
    (False, False, True, Fate.MOVE),    # never started and still wanted: another worker runs it
])
def test_each_left_job_has_one_fate(running, expired, waited_for, expected):
    assert fate(running=running, expired=expired, waited_for=waited_for) is expected
