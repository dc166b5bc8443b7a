"""Runs inside the proxy container (the backend network): samples vLLM's /metrics until killed.

argv: the metric names to sample, then the most seconds to run (a bound, should the test die
before it stops the sampler). Prints one JSON line first, {"pid": N} (the test kills the sampler
by pid when it is done), then one line per sample: {"sent", "received", "values": {name: sum}}.
The two wall-clock times bound when vLLM read the values (the container shares the host's clock).
A failed sample prints {"error": ...} and the sampler goes on: one slow answer is not the end.
"""

import http.client
import json
import os
import re
import socket
import sys
import time

*names, most_seconds = sys.argv[1:]
patterns = {name: re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M) for name in names}
print(json.dumps({"pid": os.getpid()}), flush=True)
# Resolved once, one kept-alive connection: a lookup and a connection per sample would load
# Docker's DNS and vLLM's server, which the tests measure, for nothing.
address = socket.gethostbyname(os.environ.get("DCE_VLLM_HOST", "vllm"))  # a replica: vllm-2, ...
connection = http.client.HTTPConnection(address, 8000, timeout=30)
end = time.time() + float(most_seconds)
while time.time() < end:
    sent = time.time()
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        values = {}
        for name, pattern in patterns.items():
            found = pattern.findall(text)
            if not found:
                raise LookupError(f"{name} is not in vLLM's /metrics")
            values[name] = sum(float(value) for value in found)
        print(json.dumps({"sent": sent, "received": time.time(), "values": values}), flush=True)
    except Exception as exc:  # reported to the test, which decides whether the observer broke
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        connection.close()  # reconnects on the next request
        time.sleep(0.5)
    time.sleep(0.2)
