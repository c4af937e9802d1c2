"""Events to the master, with their data at the top level (as the contract's
``hanet/failover/...`` and beacon events have it): the ``_minion_event`` load a minion
sends for its beacons, on the minion's own authenticated request channel. Salt's
``event.fire_master`` would nest the data under ``data``."""


def send(opts, tag, data, timeout=5):
    import salt.channel.client

    load = {"id": opts["id"], "cmd": "_minion_event", "pretag": None, "events": [{"tag": tag, "data": data}]}
    with salt.channel.client.ReqChannel.factory(opts) as channel:
        channel.send(load, tries=2, timeout=timeout)
