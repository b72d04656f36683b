import msgspec

from fusionrec.streams.replay import Pacer
from fusionrec.streams.state import ZsetCall, zset_args


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept = []

    def clock(self):
        return self.now

    def sleep(self, s):
        self.slept.append(round(s, 6))
        self.now += s


def test_rate_paces_events_evenly():
    c = FakeClock()
    p = Pacer(rate=10, clock=c.clock, sleep=c.sleep)
    for _ in range(5):
        p.wait(0)
    assert c.now == 0.4


def test_sleeps_come_in_quanta_and_no_event_leaves_early_by_more():
    c = FakeClock()
    p = Pacer(rate=10_000, clock=c.clock, sleep=c.sleep, quantum_s=0.002)
    sent = []
    for _ in range(101):
        p.wait(0)
        sent.append(c.now)
    assert len(c.slept) == 5  # every 20 events (2 ms at 10,000/s), not one sleep per event
    assert all(i / 10_000 - t <= 0.002 + 1e-12 for i, t in enumerate(sent))
    assert abs(sent[-1] - 0.01) < 1e-9 and all(t <= i / 10_000 + 1e-12 for i, t in enumerate(sent))


def test_speedup_follows_event_time_and_slower_limit_wins():
    c = FakeClock()
    p = Pacer(rate=1000, speedup=60, clock=c.clock, sleep=c.sleep)
    p.wait(0)
    p.wait(60_000)  # one minute of event time at 60x is one second
    assert abs(c.now - 1.0) < 1e-9


def test_zset_call_filters_by_guard_and_orders_records():
    call = ZsetCall("g", partition=3, cap=10, aggregate=False)
    call.entries["k1"] += [(7, "b", 1.0), (5, "a", 2.0), (7, "c", 1.0)]
    call.entries["k2"] += [(4, "z", 1.0)]
    keys, args, refreshed = zset_args([call], {})
    assert keys == ["g", "k1", "k2"] and refreshed == []  # no TTL: none is set
    assert args[0] == 10 and args[2:] == [0, 0, 1, 3, 4, 7]
    assert msgspec.msgpack.decode(args[1]) == [[["a", 2.0], ["b", 1.0, "c", 1.0]], [["z", 1.0]]]
    keys, args, _ = zset_args([call], {3: 5})
    assert keys == ["g", "k1"] and args[4:] == [1, 3, 7, 7]
    assert zset_args([call], {3: 7}) is None


def test_one_call_carries_every_partition_of_a_guard():
    """A set's records go partition by partition, in the calls' order; each partition has its span
    and its own floor."""
    p2 = ZsetCall("g", partition=2, cap=10, aggregate=False)
    p2.entries["k1"] += [(9, "x", 1.0), (8, "w", 1.0)]
    p0 = ZsetCall("g", partition=0, cap=10, aggregate=False)
    p0.entries["k2"] += [(1, "a", 1.0)]
    p0.entries["k1"] += [(3, "b", 2.0)]
    keys, args, _ = zset_args([p2, p0], {})
    assert keys == ["g", "k1", "k2"] and args[4:] == [2, 2, 8, 9, 0, 1, 3]
    assert msgspec.msgpack.decode(args[1]) == [[["w", 1.0], ["x", 1.0], ["b", 2.0]], [["a", 1.0]]]
    keys, args, _ = zset_args([p2, p0], {2: 9, 0: 1})
    assert keys == ["g", "k1"] and args[4:] == [1, 0, 3, 3]
    assert msgspec.msgpack.decode(args[1]) == [[["b", 2.0]]]


def test_zset_call_puts_the_sets_whose_ttl_is_due_first():
    call = ZsetCall("g", partition=0, cap=10, aggregate=False, ttl_s=60)
    call.entries["k1"] += [(1, "a", 1.0)]
    call.entries["k2"] += [(2, "b", 2.0)]
    call.entries["k3"] += [(3, "c", 3.0)]
    keys, args, refreshed = zset_args([call], {}, due=lambda key: key != "k1")
    assert keys == ["g", "k2", "k3", "k1"] and refreshed == ["k2", "k3"] and args[2:4] == [60, 2]
    assert msgspec.msgpack.decode(args[1]) == [[["b", 2.0]], [["c", 3.0]], [["a", 1.0]]]
    assert zset_args([call], {})[1][2:4] == [60, 3]  # every set is due by default


def test_aggregated_call_sums_per_member():
    call = ZsetCall("g", partition=0, cap=0, aggregate=True)
    call.entries["pop"] += [(1, "a", 1.5), (2, "b", 1.0), (3, "a", 0.5)]
    _, args, _ = zset_args([call], {})
    assert msgspec.msgpack.decode(args[1]) == [[["a", 2.0, "b", 1.0]]]
