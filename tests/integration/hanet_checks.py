"""What several lab tests check the same way: a state run through the master, and the
changes it reported."""


def state_apply(lab, tgt, test=False, timeout=240, highstate=False):
    """``state.apply hanet`` (or a highstate) on ``tgt`` (a list of minions) through the
    master. Every minion answers and no state fails."""
    fun, arg = ("state.highstate", []) if highstate else ("state.apply", ["hanet"])
    res = lab.salt(tgt, fun, arg, kwarg={"test": True} if test else None, timeout=timeout)
    assert set(res) == set(tgt), f"no answer from {set(tgt) - set(res)}"
    for minion, ret in res.items():
        assert isinstance(ret, dict), f"{minion}: {ret}"
        bad = {k: v["comment"] for k, v in ret.items() if v["result"] is False}
        assert not bad, f"{minion}: {bad}"
    return res


def changes_of(res):
    """{minion: {facet: [change, ...]}} for the states that changed (or would)."""
    out = {}
    for minion, ret in res.items():
        for v in ret.values():
            for facet, ch in (v["changes"] or {}).items():
                out.setdefault(minion, {})[facet] = ch
    return out
