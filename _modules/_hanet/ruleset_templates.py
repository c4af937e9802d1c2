"""jinja2 templates of hanet's ruleset (strings: Salt's module sync copies only *.py).

The templates only lay out text; every decision (what to match, in which order, which
names) is made in ``ruleset.py``, which hands them sorted, pre-formatted values.
"""

# nftables: one script, one ``nft -f`` transaction. Each table is first created if it is
# missing, then deleted, then defined again, so the script works whether or not hanet's
# tables exist and replaces them atomically. Nothing outside hanet's tables is named.
NFT = """\
{%- for t in tables %}
table {{ t.family }} {{ t.name }}
delete table {{ t.family }} {{ t.name }}
{%- endfor %}
{%- for t in tables %}
table {{ t.family }} {{ t.name }} {
	comment "{{ t.comment }}"
{%- for n in t.get("notes", ()) %}
	# {{ n }}
{%- endfor %}
{%- for s in t.sets %}
	{{ s.get("kind", "set") }} {{ s.name }} {
		type {{ s.type }}
{%- if s.elements %}
		elements = { {{ s.elements | join(", ") }} }
{%- endif %}
	}
{%- endfor %}
{%- for c in t.chains %}
	chain {{ c.name }} {
{%- if c.hook %}
		type {{ c.type }} hook {{ c.hook }} priority {{ c.priority }}; policy accept;
{%- endif %}
{%- for r in c.rules %}
		{{ r }}
{%- endfor %}
	}
{%- endfor %}
}
{%- endfor %}
"""

# iptables-restore --noflush input. Declaring a chain (":name - [0:0]") creates it or
# flushes it; the jumps from the builtin chains are inserted at the top (the applier
# deletes any existing jump first, in the same transaction, so there is never a duplicate).
IPTABLES = """\
{%- for t in tables %}
*{{ t.name }}
{%- for c in t.chains %}
:{{ c.name }} - [0:0]
{%- endfor %}
{%- for c in t.chains %}
{%- for r in c.rules %}
-A {{ c.name }} {{ r }}
{%- endfor %}
{%- endfor %}
{%- for c in t.chains %}
-I {{ c.builtin }} 1 -j {{ c.name }}
{%- endfor %}
COMMIT
{%- endfor %}
"""
