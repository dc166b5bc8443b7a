#!/usr/bin/env python3
"""Writes the compose files of VLLM_REPLICAS vLLM replicas on this host, for `make up`.

Replica 1 is compose.yaml's `vllm` service; replicas 2..N are copies of it (`extends`), each with
its own GPUs: VLLM_GPUS (e.g. 0,1,2,3) shared out in order, as many to each replica (two GPUs each
for --tensor-parallel-size 2), one GPU each when it is empty. In the CPU profile a second file does
to the copies what compose.cpu.yaml does to `vllm`. The router (compose.router.yaml) waits for every
replica to be healthy, then spreads the batches over them.

  replicas.py REPLICAS GPUS [--cpu]   prints the replicas' URLs for the router, one line
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPLICAS_FILE = REPO / "compose.replicas.yaml"
CPU_FILE = REPO / "compose.replicas.cpu.yaml"
_HEADER = "# Written by `make up` (scripts/replicas.py) from VLLM_REPLICAS and VLLM_GPUS in .env: change those,\n" \
          "# not this file, which the next `make up` writes again.\n"


class ReplicaError(ValueError):
    pass


def replica_names(replicas: int) -> list[str]:
    return ["vllm"] + [f"vllm-{index}" for index in range(2, replicas + 1)]


def gpu_groups(replicas: int, gpus: str) -> list[str]:
    """Each replica's GPU ids, as CUDA_VISIBLE_DEVICES takes them."""
    ids = [part.strip() for part in gpus.split(",") if part.strip()]
    if not ids:
        return [str(index) for index in range(replicas)]
    if any(not part.isdigit() for part in ids) or len(set(ids)) != len(ids):
        raise ReplicaError(f"VLLM_GPUS must list distinct GPU numbers, e.g. 0,1,2,3; it is '{gpus}'")
    if len(ids) % replicas:
        raise ReplicaError(f"VLLM_GPUS lists {len(ids)} GPUs, which {replicas} replicas cannot share equally")
    each = len(ids) // replicas
    return [",".join(ids[start:start + each]) for start in range(0, len(ids), each)]


def replicas_file(replicas: int, gpus: str, cpu: bool, compose_dir: str = ".") -> str:
    """`compose_dir`: where compose.yaml is, from where the file will be (a test writes it elsewhere)."""
    names = replica_names(replicas)
    groups = None if cpu else gpu_groups(replicas, gpus)
    lines = [_HEADER, "services:"]
    for index, name in enumerate(names):
        if name == "vllm" and groups is None:
            continue  # the CPU profile's replica 1 is compose.cpu.yaml's, unchanged
        lines.append(f"  {name}:")
        if name != "vllm":
            lines.append(f"    extends: {{file: {compose_dir}/compose.yaml, service: vllm}}")
        if groups is not None:
            # Every GPU is in the container (compose.yaml asks for all); vLLM uses only these.
            lines += ["    environment:", f'      CUDA_VISIBLE_DEVICES: "{groups[index]}"']
    lines += ["  vllm-router:", "    depends_on:"]
    lines += [f"      {name}: {{condition: service_healthy}}" for name in names]
    return "\n".join(lines) + "\n"


def cpu_file(replicas: int, compose_dir: str = ".") -> str:
    lines = [_HEADER, "services:"]
    for name in replica_names(replicas)[1:]:
        lines += [f"  {name}:", f"    extends: {{file: {compose_dir}/compose.cpu.yaml, service: vllm}}",
                  "    deploy: !reset {}  # (extends does not carry compose.cpu.yaml's own reset)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("replicas")
    parser.add_argument("gpus", nargs="?", default="")
    parser.add_argument("--cpu", action="store_true", help="the CPU profile (compose.cpu.yaml) is in use")
    args = parser.parse_args(argv)
    try:
        if not args.replicas.isdigit() or not 2 <= int(args.replicas) <= 64:
            raise ReplicaError(f"VLLM_REPLICAS must be a whole number from 1 to 64; it is '{args.replicas}'")
        replicas = int(args.replicas)
        REPLICAS_FILE.write_text(replicas_file(replicas, args.gpus, args.cpu))
    except ReplicaError as error:
        print(f"make up: {error}", file=sys.stderr)
        return 1
    if args.cpu:
        CPU_FILE.write_text(cpu_file(replicas))
    else:
        CPU_FILE.unlink(missing_ok=True)
    print(" ".join(f"http://{name}:8000" for name in replica_names(replicas)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
