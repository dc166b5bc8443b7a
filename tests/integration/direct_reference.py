"""Runs inside the proxy container (the backend network): the same streams sent straight to vLLM.

Reads a JSON list of request bodies from DCE_REFERENCE_BODIES and prints a JSON list with, for each,
{"content", "reasoning"}: every delta of choice 0 joined, the final chunk's included (vLLM sends
the last token with the finish reason), as vLLM generated them.
"""

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor


# vLLM answers only the proxy's key: this runs in the proxy's container, which holds it.
with open("/run/secrets/vllm_api_key") as key_file:
    VLLM_KEY = key_file.read().strip()


def stream_text(body):
    request = urllib.request.Request("http://vllm:8000/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {VLLM_KEY}"})
    text = {"content": "", "reasoning": ""}
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                if choices:
                    delta = choices[0]["delta"]
                    for field in text:
                        text[field] += delta.get(field) or ""
    return text


bodies = json.loads(os.environ["DCE_REFERENCE_BODIES"])
with ThreadPoolExecutor(len(bodies)) as pool:
    print(json.dumps(list(pool.map(stream_text, bodies))))
