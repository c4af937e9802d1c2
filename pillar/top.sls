base:
  '*':
    - hanet
