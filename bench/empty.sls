# Salt's own cost of a state run (bench/apply_scale.py): one no-op state, nothing else.
bench-nop:
  test.nop: []
