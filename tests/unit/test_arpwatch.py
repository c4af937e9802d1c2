"""The lab's "two holders" measure, from the prober's lines (no namespaces needed)."""

from hanet_lab.arpwatch import _parse, _request, summarize


def rounds(*holders_per_round, ip="10.20.0.1"):
    lines = []
    for n, macs in enumerate(holders_per_round, 1):
        lines.append({"round": n, "t": 100.0 + n * 0.02})
        lines += [{"round": n, "t": 100.0 + n * 0.02 + 0.001, "ip": ip, "mac": m, "kind": "reply"} for m in macs]
    return lines


def test_rounds_with_two_macs_are_seconds_with_two_holders():
    got = summarize(rounds(["a"], ["a"], ["a", "b"], ["b"], ["a", "b"], ["b"]), 0.02)["10.20.0.1"]
    assert got["two_holders_s"] == 0.04 and got["macs"] == ["a", "b"] and got["rounds"] == 6
    assert got["silent_s"] == 0


def test_rounds_nobody_answers_are_silence():
    got = summarize(rounds(["a"], [], [], ["b"]), 0.02)["10.20.0.1"]
    assert got["two_holders_s"] == 0 and got["silent_s"] == 0.04


def test_an_announcement_counts_as_a_holder_in_its_round():
    lines = rounds(["a"], ["a"])
    lines.append({"round": 2, "t": 100.05, "ip": "10.20.0.1", "mac": "b", "kind": "announce"})
    got = summarize(lines, 0.02)["10.20.0.1"]
    assert got["two_holders_s"] == 0.02 and got["announced_by"] == ["b"]


def test_the_probe_frame_parses_back():
    frame = _request(b"\x02\x00\x00\x00\x00\x01", "10.20.0.1")
    assert _parse(frame) == (1, "02:00:00:00:00:01", "0.0.0.0", "10.20.0.1")
