{#- hanet: a liveness transition (salt/beacon/<observer>/hanet_liveness/<peer>/<down|up>)
    goes to the hanet runner, which validates, confirms and moves the network. The reactor
    renders serially in one process, so this stays trivial: no logic here. -#}
hanet-liveness:
  runner.hanet.liveness:
    - args:
      - tag: {{ tag | json }}
      - data: {{ data | json }}
