# bench/floating.py: the floating IPs of the benchmark done the way a user would without
# hanet, with Salt's built-in states only (pillar key `bench_floating`): per floating IP
# the /32 (cmd.run ip addr add, `unless` it is there), a gratuitous ARP when it was added,
# and iptables.append for DNAT (PREROUTING and OUTPUT), SNAT and the hairpin masquerade;
# once: forwarding (sysctl.present), the FORWARD accept, and a file.managed record.
{%- set b = salt['pillar.get']('bench_floating', {}) %}
{%- set dev = b.get('interface', 'eth0') %}
bench-forwarding:
  sysctl.present:
    - name: net.ipv4.ip_forward
    - value: 1
    - config: {{ b.get('root', '/tmp') }}/sysctl-bench.conf

bench-forward-dnat:
  iptables.append:
    - table: filter
    - chain: FORWARD
    - match: conntrack
    - ctstate: DNAT
    - jump: ACCEPT

bench-record:
  file.managed:
    - name: {{ b.get('root', '/tmp') }}/floating.list
    - makedirs: True
    - contents: |
{%- for f in b.get('floating', []) %}
        {{ f.address }} {{ f.fixed_ip }}
{%- endfor %}

{%- for f in b.get('floating', []) %}
fip-addr-{{ f.address }}:
  cmd.run:
    - name: ip addr add {{ f.address }}/32 dev {{ dev }}
    - unless: ip -o -4 addr show dev {{ dev }} | grep -qF ' {{ f.address }}/32 '

fip-garp-{{ f.address }}:
  cmd.run:
    - name: arping -q -U -c 1 -w 0 -I {{ dev }} {{ f.address }} || true
    - onchanges:
      - cmd: fip-addr-{{ f.address }}

fip-dnat-{{ f.address }}:
  iptables.append:
    - table: nat
    - chain: PREROUTING
    - destination: {{ f.address }}/32
    - jump: DNAT
    - to-destination: {{ f.fixed_ip }}

fip-dnat-out-{{ f.address }}:
  iptables.append:
    - table: nat
    - chain: OUTPUT
    - destination: {{ f.address }}/32
    - jump: DNAT
    - to-destination: {{ f.fixed_ip }}

fip-snat-{{ f.address }}:
  iptables.append:
    - table: nat
    - chain: POSTROUTING
    - source: {{ f.fixed_ip }}/32
    - out-interface: {{ dev }}
    - jump: SNAT
    - to-source: {{ f.address }}

fip-hairpin-{{ f.address }}:
  iptables.append:
    - table: nat
    - chain: POSTROUTING
    - source: {{ b.get('cidr') }}
    - destination: {{ f.fixed_ip }}/32
    - match: conntrack
    - ctstate: DNAT
    - jump: MASQUERADE
{%- endfor %}
