{#- hanet: warm the failover path in the reactor's process (its first rendering, the
    runner's imports, the pillar) when a minion starts (salt/minion/*/start) and after
    every hanet highstate (hanet/prime), so that a failover does not pay for them.
    Trivial on purpose. -#}
hanet-prime:
  runner.hanet.prime:
    - args:
      - data: {{ data | json }}
