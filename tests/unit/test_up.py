"""`make up` (scripts/up.sh) decides where images come from once, keeps it in .env, and builds only
what the host runs (issue 12). Docker and the image builds are stubs that record their calls."""

from __future__ import annotations

import pytest

from make_up import env_values as _env, run_up as _up


def test_local_images_build_only_what_the_host_runs(checkout):
    result = _up(checkout, "DCE_IMAGES=local\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (checkout / "built").read_text() == "caddy proxy vllm\n"  # CPU profile, one worker: no Redis
    assert _env(checkout, "CADDY_IMAGE")[-1] == "dce-caddy:2.11.7"
    assert "up -d --remove-orphans --wait" in (checkout / "docker").read_text()  # no --build: nothing to pull


def test_several_workers_add_the_redis_image(checkout):
    result = _up(checkout, "DCE_IMAGES=local\nDCE_PROXY_WORKERS=2\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (checkout / "built").read_text() == "caddy proxy limits vllm\n"


@pytest.mark.parametrize(("cores", "workers", "built"), [("2", "1", "caddy proxy vllm\n"),
                                                        ("16", "4", "caddy proxy limits vllm\n"),
                                                        ("128", "8", "caddy proxy limits vllm\n")])
def test_an_unset_worker_count_is_chosen_from_the_cores_once_and_kept(checkout, cores, workers, built):
    result = _up(checkout, "DCE_IMAGES=local\n", {"STUB_CORES": cores})
    assert result.returncode == 0, result.stdout + result.stderr
    assert _env(checkout, "DCE_PROXY_WORKERS") == [workers]
    assert f"DCE_PROXY_WORKERS={workers} for this host's {cores} cores" in result.stdout
    assert (checkout / "built").read_text() == built  # several workers: their Redis too
    assert ("compose.scale.yaml" in _env(checkout, "COMPOSE_FILE")[-1]) == (workers != "1")


def test_the_worker_count_counts_the_cores_whatever_openmp_is_told(checkout):
    # nproc reports OMP_NUM_THREADS when set, as it often is in an ML user's shell.
    result = _up(checkout, "DCE_IMAGES=local\n", {"STUB_CORES": "16", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert _env(checkout, "DCE_PROXY_WORKERS") == ["4"]


def test_a_worker_count_that_is_not_a_number_stops_make_up(checkout):
    result = _up(checkout, "DCE_IMAGES=local\nDCE_PROXY_WORKERS=auto\n")
    assert result.returncode == 1
    assert "DCE_PROXY_WORKERS in .env must be a whole number" in result.stdout
    assert not (checkout / "docker").exists() or " up " not in (checkout / "docker").read_text()


def test_monitoring_adds_prometheus_to_the_compose_files_and_to_the_local_images(checkout):
    result = _up(checkout, "DCE_IMAGES=local\nDCE_MONITORING=true\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (checkout / "built").read_text() == "caddy proxy vllm prometheus\n"
    assert _env(checkout, "COMPOSE_FILE")[-1] == "compose.yaml:compose.cpu.yaml:compose.monitoring.yaml"
    assert _env(checkout, "PROMETHEUS_IMAGE")[-1] == "dce-prometheus:local"
    assert "Prometheus on http://127.0.0.1:9090" in result.stdout


def test_an_earlier_local_choice_is_kept_and_recorded(checkout):
    # .env written by a `make up` from before DCE_IMAGES: its local image names say what it chose.
    result = _up(checkout, "CADDY_IMAGE=dce-caddy:2.11.7\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _env(checkout, "DCE_IMAGES")[-1] == "local"
    assert "DCE_IMAGES=local, recorded in .env" in result.stdout


def test_the_old_name_of_the_stop_grace_carries_over(checkout):
    result = _up(checkout, "DCE_IMAGES=local\nDCE_PROXY_GRACEFUL_TIMEOUT=60\nDCE_STOP_GRACE_SECONDS=\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _env(checkout, "DCE_STOP_GRACE_SECONDS")[-1] == "60"
    assert "is now DCE_STOP_GRACE_SECONDS" in result.stdout


def test_a_stop_grace_that_is_not_a_number_of_seconds_stops_with_a_reason(checkout):
    result = _up(checkout, "DCE_IMAGES=local\nDCE_STOP_GRACE_SECONDS=10m\n")
    assert result.returncode == 1 and "whole number of seconds" in result.stdout


def test_an_unknown_image_source_stops_with_a_reason(checkout):
    result = _up(checkout, "DCE_IMAGES=dockerhub\n")
    assert result.returncode == 1
    assert "must be registry or local" in result.stdout
    assert not (checkout / "docker").exists() or "up -d" not in (checkout / "docker").read_text()


def test_an_upgrade_pulls_the_registrys_images_the_host_runs_then_recreates_what_changed(checkout):
    result = _up(checkout, "DCE_IMAGES=registry\nDCE_MONITORING=true\n", {"DCE_UPGRADE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (checkout / "docker").read_text().splitlines()
    # The CPU profile's engine image is built here: not pulled.
    pull = calls.index("compose pull caddy prometheus")
    # The proxy's and Redis's bases too (python, debian), then what changed is recreated.
    assert calls[pull + 1] == "compose build --pull"
    front_door = calls.index("compose up -d --remove-orphans --build caddy model-download")
    assert pull < front_door and calls[-1].startswith("compose up -d --remove-orphans --build --wait")


def test_an_upgrade_of_local_images_builds_every_layer_again(checkout):
    assert _up(checkout, "DCE_IMAGES=local\n").returncode == 0
    assert _up(checkout, "DCE_IMAGES=local\n", {"DCE_UPGRADE": "1"}).returncode == 0
    assert (checkout / "fresh").read_text().split() == ["cached", "1"]  # a start uses the cache, an upgrade not


def test_a_plain_start_pulls_nothing(checkout):
    result = _up(checkout, "DCE_IMAGES=registry\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(" pull" in call for call in (checkout / "docker").read_text().splitlines())


def test_the_first_start_makes_a_key_and_says_where_never_what(checkout):
    result = _up(checkout, "DCE_IMAGES=local\n")
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = (checkout / "secrets/dce_api_keys").read_text().splitlines()
    key = line.split(":", 1)[1]
    assert len(key) >= 32 and key not in result.stdout + result.stderr  # CI logs keep what make up prints
    assert "secrets/dce_api_keys" in result.stdout


def test_the_front_door_opens_first_and_the_download_shows_its_progress(checkout):
    (checkout / "bin/docker").write_text(f"""#!/bin/sh
echo "$*" >> {checkout}/docker
case "$*" in
  "compose ps --all --quiet model-download") echo c0ffee ;;
  "logs --follow --since "*" c0ffee") echo "downloading the model: 43 % (5.2 of 12.1 GB)" ;;
esac
""")
    result = _up(checkout, "DCE_IMAGES=local\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model-download: downloading the model: 43 % (5.2 of 12.1 GB)" in result.stdout
    calls = (checkout / "docker").read_text().splitlines()
    front_door = calls.index("compose up -d --remove-orphans caddy model-download")
    assert calls[front_door + 1] == "compose ps --all --quiet model-download"
    assert calls[front_door + 2].startswith("logs --follow --since ") and calls[front_door + 2].endswith(" c0ffee")
    assert calls[front_door + 3].startswith("compose up -d --remove-orphans --wait")
