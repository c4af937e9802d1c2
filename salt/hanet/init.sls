# hanet: make this minion exactly what the hanet pillar says for it.
# Every state below is thin: it computes the desired state from the pillar, compares it
# with the host, and changes only the difference (see _states/hanet.py).
hanet-pillar:
  hanet.validated: []

hanet-links:
  hanet.links:
    - require:
      - hanet: hanet-pillar

hanet-sysctls:
  hanet.sysctls:
    - require:
      - hanet: hanet-links

hanet-ruleset:
  hanet.ruleset:
    - require:
      - hanet: hanet-links

hanet-conntrackd:
  hanet.conntrackd:
    - require:
      - hanet: hanet-ruleset

hanet-dnsmasq:
  hanet.dnsmasq:
    - require:
      - hanet: hanet-ruleset

hanet-metadata:
  hanet.metadata:
    - require:
      - hanet: hanet-ruleset

hanet-floating:
  hanet.floating_ips:
    - require:
      - hanet: hanet-ruleset

hanet-liveness:
  hanet.liveness:
    - require:
      - hanet: hanet-dnsmasq

hanet-startup:
  hanet.startup:
    - require:
      - hanet: hanet-pillar
