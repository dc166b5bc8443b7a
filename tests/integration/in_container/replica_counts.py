"""Runs inside the proxy container (the backend network): one reading of a vLLM metric on each replica.

argv: the metric's name, then the replicas' host names. Prints {replica: value} as one JSON line, the
value summed over the metric's labels; a replica that does not answer is null (it may be down).
"""

import json
import re
import sys
import urllib.request

name, *replicas = sys.argv[1:]
pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
values = {}
for replica in replicas:
    try:
        text = urllib.request.urlopen(f"http://{replica}:8000/metrics", timeout=30).read().decode()
    except OSError:
        values[replica] = None
        continue
    found = pattern.findall(text)
    if not found:
        sys.exit(f"{name} is not in {replica}'s /metrics")
    values[replica] = sum(float(value) for value in found)
print(json.dumps(values))
