"""More than one vLLM (issue 16): `make up` writes the replicas' compose files (scripts/replicas.py)
and puts the vLLM router before them. Docker is a stub here (test_up.py's checkout); the composed
router and replicas run in tests/integration/test_replicas.py."""

from __future__ import annotations

import sys

import pytest

from make_up import REPO, env_values as _env, run_up as _up

sys.path.insert(0, str(REPO / "scripts"))
from replicas import ReplicaError, gpu_groups, replicas_file  # noqa: E402


@pytest.mark.parametrize("replicas, gpus, groups", [
    (2, "", ["0", "1"]),  # one GPU each by default
    (4, "0,1,2,3", ["0", "1", "2", "3"]),
    (2, "0,1,2,3", ["0,1", "2,3"]),  # tensor parallelism over two GPUs each
    (2, " 4, 5 ", ["4", "5"]),
])
def test_gpus_are_shared_out_in_order(replicas, gpus, groups):
    assert gpu_groups(replicas, gpus) == groups


@pytest.mark.parametrize("replicas, gpus", [(3, "0,1"), (2, "0,0"), (2, "0,a")])
def test_gpus_that_cannot_be_shared_are_refused(replicas, gpus):
    with pytest.raises(ReplicaError):
        gpu_groups(replicas, gpus)


def test_each_gpu_replica_sees_only_its_gpus_and_the_router_waits_for_all():
    text = replicas_file(3, "", cpu=False)
    assert text.count("extends: {file: ./compose.yaml, service: vllm}") == 2
    for index, name in enumerate(["vllm", "vllm-2", "vllm-3"]):
        block = text.split(f"  {name}:\n", 1)[1].split("\n  vllm", 1)[0]
        assert f'CUDA_VISIBLE_DEVICES: "{index}"' in block
        assert f"      {name}: {{condition: service_healthy}}" in text


def test_two_replicas_on_the_cpu_bring_the_router_and_its_image(checkout):
    result = _up(checkout, "DCE_IMAGES=local\nVLLM_REPLICAS=2\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _env(checkout, "COMPOSE_FILE")[-1] == ("compose.yaml:compose.cpu.yaml:compose.router.yaml:"
                                                  "compose.replicas.yaml:compose.replicas.cpu.yaml")
    assert _env(checkout, "VLLM_WORKER_URLS")[-1] == "http://vllm:8000 http://vllm-2:8000"
    assert "router" in (checkout / "built").read_text().split()
    assert "extends: {file: ./compose.cpu.yaml, service: vllm}" in (checkout / "compose.replicas.cpu.yaml").read_text()


def test_servers_on_other_hosts_join_the_local_one_behind_the_router(checkout):
    result = _up(checkout, "DCE_IMAGES=local\nVLLM_REMOTE_URLS=http://gpu2.lan:8000 http://gpu3.lan:8000\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _env(checkout, "COMPOSE_FILE")[-1] == "compose.yaml:compose.cpu.yaml:compose.router.yaml"
    assert _env(checkout, "VLLM_WORKER_URLS")[-1] == "http://vllm:8000 http://gpu2.lan:8000 http://gpu3.lan:8000"


def test_one_vllm_is_the_stack_as_before(checkout):
    result = _up(checkout, "DCE_IMAGES=local\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _env(checkout, "COMPOSE_FILE")[-1] == "compose.yaml:compose.cpu.yaml"
    assert not _env(checkout, "VLLM_WORKER_URLS") and not (checkout / "compose.replicas.yaml").exists()


@pytest.mark.parametrize("replicas", ["0", "two", "65"])
def test_a_replica_count_that_makes_no_sense_stops_make_up(checkout, replicas):
    result = _up(checkout, f"DCE_IMAGES=local\nVLLM_REPLICAS={replicas}\n")
    assert result.returncode != 0 and "VLLM_REPLICAS must be a whole number" in result.stderr
    assert not (checkout / "docker").exists() or "up -d" not in (checkout / "docker").read_text()
