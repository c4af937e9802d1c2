# An example top file: every minion that takes part in hanet gets the hanet state.
base:
  '*':
    - hanet
