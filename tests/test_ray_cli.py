"""`cfr-serve --ray ADDRESS` and its cluster options: every bad value or combination is one usage error
(`cfr-serve: error: ...`, exit 2) before anything starts, and good ones reach `serve_on_ray` as given."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")

from cfr_runtime.serve import cli  # noqa: E402
from cfr_runtime.serve.cluster import options as cluster_cli  # noqa: E402
from tests.ray_util import free_ports, require_ray_serve  # noqa: E402


def run(args: list[str]):
    return CliRunner().invoke(cli.main, args)


@pytest.mark.parametrize("args, flags", [
    (["--replicas", "3"], "--replicas needs --ray"),
    (["--batch-size", "4", "--ingress", "direct"], "--batch-size, --ingress need --ray"),
    (["--replica-gpus", "0.5"], "--replica-gpus needs --ray"),
    (["--batch-wait-ms", "2"], "--batch-wait-ms needs --ray"),
])
def test_cluster_options_without_ray_are_refused(args, flags):
    result = run(args)
    assert result.exit_code == 2 and f"cfr-serve: error: {flags} ADDRESS" in result.output, result.output


@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "must be positive, got 0"),
    (["--replica-cpus", "-1"], "--replica-cpus"),
    (["--batch-size", "0"], "must be positive"),
    (["--batch-wait-ms", "0"], "must be positive"),
    (["--ingress", "proxy"], "'proxy' is not one of 'gateway', 'direct'"),
    (["--batch-size", "4"], "the model has no batch axis; export it with one (cfr-export CHECKPOINT -o DIR "
                            "--max-batch 4)"),
])
def test_bad_cluster_values_are_refused_before_anything_starts(monkeypatch, args, message):
    started = []
    monkeypatch.setattr("cfr_runtime.serve.cluster.serve_on_ray", lambda *a, **k: started.append(a))
    result = run(["--ray", "127.0.0.1:6379", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not started


def test_a_batch_larger_than_the_models_axis_is_refused(monkeypatch):
    monkeypatch.setattr(cluster_cli, "model_max_batch", lambda model: 4)
    monkeypatch.setattr("cfr_runtime.serve.cluster.serve_on_ray", lambda *a, **k: None)
    result = run(["--ray", "auto", "--batch-size", "8"])
    assert result.exit_code == 2 and "--batch-size 8: the model takes batches of at most 4" in result.output
    assert run(["--ray", "auto", "--batch-size", "4"]).exit_code == 0


def test_options_reach_serve_on_ray(monkeypatch):
    seen = {}

    def fake(address, model, config, options, host, port):
        seen.update(address=address, model=model, config=config, options=options, host=host, port=port)

    monkeypatch.setattr("cfr_runtime.serve.cluster.serve_on_ray", fake)
    monkeypatch.setattr(cluster_cli, "model_max_batch", lambda model: 8)
    result = run(["--ray", "10.0.0.5:6379", "--replicas", "3", "--replica-cpus", "0.5", "--replica-gpus", "0.25",
                  "--batch-size", "8", "--batch-wait-ms", "2.5", "--ingress", "direct", "--threads", "1",
                  "--idle-timeout", "60", "--max-sessions", "10", "--port", "9000"])
    assert result.exit_code == 0, result.output
    o = seen["options"]
    assert seen["address"] == "10.0.0.5:6379" and (seen["host"], seen["port"]) == ("127.0.0.1", 9000)
    assert (o.replicas, o.replica_cpus, o.replica_gpus, o.max_batch_size, o.ingress, o.threads) == (
        3, 0.5, 0.25, 8, "direct", 1)
    assert o.batch_wait_timeout_s == pytest.approx(0.0025)
    assert seen["config"].store.idle_timeout_s == 60 and seen["config"].store.max_sessions == 10


def test_the_serve_limits_reach_the_cluster_config(monkeypatch):
    """The replicas run the same app as plain cfr-serve, so the Host guard, client identity and per-client limits
    given on the command line must reach the config every replica is built with."""
    seen = {}
    monkeypatch.setattr("cfr_runtime.serve.cluster.serve_on_ray", lambda address, model, config, *a, **k:
                        seen.update(config=config))
    result = run(["--ray", "auto", "--host", "0.0.0.0", "--allowed-host", "annot.example.org",
                  "--client-identity", "header", "--client-header", "X-User", "--client-max-inflight", "5",
                  "--queue-timeout", "7", "--client-max-sessions", "3", "--max-side", "4000"])
    assert result.exit_code == 0, result.output
    c = seen["config"]
    assert "annot.example.org" in c.allowed_hosts and "localhost" in c.allowed_hosts
    assert "0.0.0.0" not in c.allowed_hosts
    assert (c.client_identity, c.client_header, c.client_max_inflight, c.queue_timeout_s) == ("header", "x-user", 5, 7)
    assert (c.store.client_max_sessions, c.upload.max_side) == (3, 4000)


def test_a_bad_serve_limit_is_refused_with_ray_too(monkeypatch):
    started = []
    monkeypatch.setattr("cfr_runtime.serve.cluster.serve_on_ray", lambda *a, **k: started.append(a))
    result = run(["--ray", "auto", "--client-header", "X-User"])
    assert result.exit_code == 2 and "--client-header x-user is used only with --client-identity header" in (
        result.output), result.output
    assert not started


def test_config_from_matches_the_cli_defaults_and_reads_serve_config_strings(monkeypatch):
    """`serve run` config files reach the same limits as the CLI (strings, comma-separated host names)."""
    from cfr_runtime.serve.app import ServeConfig
    from cfr_runtime.serve.cluster import config_from, deploy

    default = config_from()
    assert (default.allowed_hosts, default.client_identity, default.client_max_inflight, default.queue_timeout_s,
            default.store, default.upload) == (ServeConfig().allowed_hosts, "address", 32, 120.0,
                                               ServeConfig().store, ServeConfig().upload)
    captured = {}
    monkeypatch.setattr(deploy, "build_app", lambda model, config, options: captured.update(config=config))
    deploy.app_builder({"allowed_hosts": "a.example, b.example", "client_identity": "header",
                        "client_max_sessions": "4", "max_side": "5000", "queue_timeout": "9.5"})
    c = captured["config"]
    assert {"a.example", "b.example", "127.0.0.1"} <= set(c.allowed_hosts)
    assert (c.client_identity, c.store.client_max_sessions, c.upload.max_side, c.queue_timeout_s) == (
        "header", 4, 5000, 9.5)
    with pytest.raises(Exception, match="client_max_sessions: 'many' is not a valid value"):
        deploy.app_builder({"client_max_sessions": "many"})


def test_an_unreachable_cluster_is_one_error_at_once():
    require_ray_serve()
    port = free_ports(1)[0]  # nothing listens there
    result = run(["--ray", f"127.0.0.1:{port}"])
    assert result.exit_code == 2 and "cannot reach the Ray cluster" in result.output, result.output


@pytest.mark.parametrize("haproxy", [False, True])
def test_serve_on_ray_points_at_the_fast_mode_when_it_is_off(monkeypatch, capsys, haproxy):
    """Serve's default proxy costs several times the high-throughput mode's routing per click (docs/ray.md), and
    only the operator can turn that mode on (every `ray start`): cfr-serve says so when it deploys without it."""
    pytest.importorskip("ray", reason="Ray is not installed")
    import ray
    from ray import serve

    from cfr_runtime.serve.cluster import deploy

    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1" if haproxy else "0")
    monkeypatch.setattr(deploy, "check_reachable", lambda address: None)
    monkeypatch.setattr(deploy, "build_app", lambda *args: "app")
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(serve, "run", lambda app, **kwargs: None)
    assert deploy.serve_on_ray("127.0.0.2:6379", block=False) == "http://127.0.0.1:8000/"
    err = capsys.readouterr().err
    assert "cfr-serve: http://127.0.0.1:8000/" in err
    assert ("RAY_SERVE_ENABLE_HA_PROXY=1" in err) is not haproxy, err
