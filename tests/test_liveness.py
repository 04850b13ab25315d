"""`depio.runtime.liveness.Liveness` with a fake clock."""
from depio.runtime.liveness import Liveness


def test_heartbeat_due_after_an_interval_of_silence():
    lv = Liveness(1.0, 3, now=100.0)
    assert not lv.heartbeat_due(100.5)
    assert lv.heartbeat_due(101.0)
    lv.sent(101.0)
    assert not lv.heartbeat_due(101.9)
    assert lv.heartbeat_due(102.0)


def test_expired_after_liveness_intervals_without_hearing():
    lv = Liveness(1.0, 3, now=100.0)
    assert not lv.expired(103.0)
    assert lv.expired(103.01)
    lv.heard(103.0)
    assert not lv.expired(105.0)
    assert abs(lv.silence(105.0) - 2.0) < 1e-9
    lv.sent(200.0)              # sending does not keep the peer alive
    assert lv.expired(200.0)


def test_next_deadline_is_the_earlier_of_heartbeat_and_expiry():
    lv = Liveness(1.0, 3, now=10.0)
    assert lv.next_deadline() == 11.0
    lv.sent(12.5)
    assert lv.next_deadline() == 13.0       # expiry: heard at 10, 3 intervals
    lv.heard(12.5)
    assert lv.next_deadline() == 13.5


def test_interval_and_liveness_can_be_changed_after_connect():
    lv = Liveness(10.0, 3, now=0.0)
    lv.interval, lv.liveness = 0.5, 2
    assert lv.heartbeat_due(0.5)
    assert lv.expired(1.01)
    assert lv.next_deadline() == 0.5
