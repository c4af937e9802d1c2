{#- hanet: warm the failover runner when a minion starts (imports, pillar), so that the
    first failover after a (re)start does not pay for them. Trivial on purpose. -#}
hanet-prime:
  runner.hanet.prime:
    - args:
      - data: {{ data | json }}
