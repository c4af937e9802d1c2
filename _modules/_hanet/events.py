"""Events to the master, with their data at the top level (as the contract's
``hanet/failover/...`` and beacon events have it): the ``_minion_event`` load a minion
sends for its beacons, on the minion's own authenticated request channel. Salt's
``event.fire_master`` would nest the data under ``data``."""


def send(opts, tag, data, timeout=5):
    import salt.channel.client

    load = {"id": opts["id"], "cmd": "_minion_event", "pretag": None, "events": [{"tag": tag, "data": data}]}
    with salt.channel.client.ReqChannel.factory(opts) as channel:
        channel.send(load, tries=2, timeout=timeout)


# Every event hanet fires, for docs/reference.md (docs/generate.py): (tag, who fires it,
# when, an example of its data). The tags are the contract's (§5) and contract-notes'.
CATALOGUE = (
    (
        "salt/beacon/<observer>/hanet_liveness/<peer>/down",
        "a host's hanet_liveness beacon",
        "the peer missed probe_misses probes (signed by the observer's minion key)",
        {
            "observer": "compute1",
            "peer": "net1",
            "state": "down",
            "detected_at": 1796258425.05,
            "targets": ["br200:10.20.0.2"],
            "id": "compute1",
            "nonce": "9f1c...",
            "sig": "base64...",
        },
    ),
    (
        "salt/beacon/<observer>/hanet_liveness/<peer>/up",
        "a host's hanet_liveness beacon",
        "the peer answers again (rise probes in a row)",
        {
            "observer": "compute1",
            "peer": "net1",
            "state": "up",
            "detected_at": 1796258480.2,
            "targets": ["br200:10.20.0.2"],
            "id": "compute1",
            "nonce": "41aa...",
            "sig": "base64...",
        },
    ),
    (
        "salt/beacon/<host>/hanet_liveness/<host>/impaired",
        "a network host's beacon (health watch)",
        "the host lost its uplink or a segment link: it cannot serve the networks in lost",
        {
            "observer": "net1",
            "peer": "net1",
            "state": "impaired",
            "lost": ["shared"],
            "detected_at": 1796258425.05,
            "nonce": "...",
            "sig": "...",
        },
    ),
    (
        "salt/beacon/<host>/hanet_liveness/<host>/healthy",
        "a network host's beacon (health watch)",
        "the host can serve all its networks again",
        {
            "observer": "net1",
            "peer": "net1",
            "state": "healthy",
            "lost": [],
            "detected_at": 1796258490.0,
            "nonce": "...",
            "sig": "...",
        },
    ),
    (
        "hanet/failover/<network>/complete",
        "the host that took the network over",
        "a failover or planned move ended: gateway, floating IPs and DHCP serve from the new owner",
        {
            "network": "shared",
            "from": "net1",
            "to": "net2",
            "epoch": 4,
            "detected_at": 1796258425.05,
            "completed_at": 1796258425.61,
            "addresses": ["10.20.0.1", "203.0.113.60"],
            "planned": False,
            "bound_by": "warm",
            "decision": {"via": "engine", "received_at": 1796258425.07},
            "timings": {"bound_s": 0.093, "announced_s": 0.185, "dhcp_s": 0.242},
        },
    ),
    (
        "hanet/failover/<network>/failed",
        "the host ordered to take the network over",
        "the takeover could not complete (the reconcile loop orders it again)",
        {
            "network": "shared",
            "from": "net1",
            "to": "net2",
            "epoch": 4,
            "reason": "10.20.0.1 answers from ...",
            "failed_at": 1796258425.4,
        },
    ),
    (
        "hanet/failover/<network or unknown>/rejected",
        "the master (runner hanet.liveness)",
        "a liveness report was refused: forged, stale, replayed, not a peer, the suspect answers, no standby",
        {
            "reason": "second opinion: net1 answers the master (192.0.2.21)",
            "event_tag": "salt/beacon/...",
            "observer": "compute1",
            "peer": "net1",
            "at": 1796258425.1,
        },
    ),
    (
        "hanet/daemon/<minion>/<daemon>/<name>/restarted",
        "a host's beacon (supervise)",
        "dnsmasq or the metadata service died and was started again",
        {"host": "compute1", "daemon": "dnsmasq", "name": "private", "pid": 4242, "at": 1796258425.0},
    ),
    (
        "hanet/prime",
        "state hanet.startup (end of a hanet highstate)",
        "the master warms its failover path (the engine's runner, the watch)",
        {"id": "net2"},
    ),
)
