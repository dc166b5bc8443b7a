"""One DCE batch, timed. engine_batch.py runs it inside the proxy container with `python3 -c`, for
both paths, so the client code, its Python and its place are the same; it needs only the standard library.

Reads from its environment
  BATCH_URL     http://vllm:8000/v1/chat/completions (direct) or https://caddy/k/KEY/api/dce/proxy (stack)
  BATCH_BODIES  a JSON list of request bodies: one stream each, all sent at once, as the extension does
  BATCH_CA      for https: Caddy's root certificate (PEM)
and prints one JSON object: the batch's seconds (first connection opened -> last stream ended), each
stream's status and whole body, and how many tokens vLLM generated meanwhile. It reads each body to
its end and no more: engine_batch.py reads the bodies afterwards, the stack's with the extension's
own rules (tests/wire.py), which this container's standard library has no copy of.
"""

import http.client
import json
import os
import re
import ssl
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

SITE = "localhost"  # Caddy's site address (DCE_DOMAIN): the name its certificate is for
METRICS = "http://vllm:8000/metrics"


class SiteConnection(http.client.HTTPSConnection):
    """TLS to the caddy container, asking for and verifying the site's name, as a client of `localhost` does."""

    def connect(self):
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=SITE)


def open_connection(url):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        context = ssl.create_default_context(cadata=os.environ["BATCH_CA"])
        return SiteConnection(parts.hostname, parts.port or 443, context=context, timeout=600), {"Host": SITE}
    # Straight to vLLM, which answers only the proxy's key: this runs in the proxy's container.
    with open("/run/secrets/vllm_api_key") as key_file:
        vllm_key = key_file.read().strip()
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=600), \
        {"Authorization": f"Bearer {vllm_key}"}


def stream(url, body, start):
    start.wait()
    began = time.perf_counter()
    connection, headers = open_connection(url)
    result = {"status": 0, "body": ""}
    try:
        # Only Content-Type, like the extension.
        connection.request("POST", urllib.parse.urlsplit(url).path, body=json.dumps(body).encode(),
                           headers={**headers, "Content-Type": "application/json"})
        response = connection.getresponse()
        result["status"] = response.status
        result["body"] = response.read().decode(errors="replace")
    finally:
        connection.close()
    result.update(began=began, ended=time.perf_counter())
    return result


def generated_tokens():
    text = urllib.request.urlopen(METRICS, timeout=10).read().decode()
    return sum(float(value) for value in re.findall(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", text, re.M))


def settled_generated_tokens():
    # vLLM counts a step's tokens after it has sent them out, so the last step may land a moment
    # after the streams end: read until the counter stops moving (nothing else uses this engine).
    last = generated_tokens()
    for _ in range(25):
        time.sleep(0.2)
        now = generated_tokens()
        if now == last:
            break
        last = now
    return last


def main():
    url = os.environ["BATCH_URL"]
    bodies = json.loads(os.environ["BATCH_BODIES"])
    tokens_before = settled_generated_tokens()
    # The threads wait at the barrier so that every request leaves at once, not as each thread starts.
    start = threading.Barrier(len(bodies))
    with ThreadPoolExecutor(len(bodies)) as pool:
        streams = list(pool.map(lambda body: stream(url, body, start), bodies))
    seconds = max(s["ended"] for s in streams) - min(s["began"] for s in streams)
    print(json.dumps({"seconds": seconds, "streams": streams,
                      "generated_tokens": settled_generated_tokens() - tokens_before}))


if __name__ == "__main__":
    main()
