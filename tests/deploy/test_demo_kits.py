"""`fedbus demo` builds its federation with provisioning: the kits a deployment would get."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from broker.files import read_toml
from broker.server.config import BrokerConfig
from node.cli import _credentials
from node.config import load_director_config, load_envoy_config
from node.demo.launcher import Federation, Options
from tests.datafiles import PNEUMONIAMNIST


def federation(tmp_path: Path, transport: str) -> Federation:
    opts = Options(
        envoys=3,
        rounds=2,
        data=str(PNEUMONIAMNIST),
        out=str(tmp_path / "run"),
        transport=transport,
        limit=100,
        director_set={"train.local_epochs": 1, "model.width": 8},
        quiet=True,
    )
    return Federation(opts)


def test_demo_kits_are_provisioned_kits_with_the_demo_settings(tmp_path: Path) -> None:
    fed = federation(tmp_path, "mqtt")
    fed.prepare()
    fed.write_configs()
    roster = read_toml(fed.kits / "roster.toml")
    assert set(roster["nodes"]) == {"director", "envoy-1", "envoy-2", "envoy-3"}
    assert fed.broker_url == roster["bus_url"] and fed.broker_url.startswith("mqtts://127.0.0.1:")
    director = load_director_config(fed.config("director"))
    assert director.state_dir == str(fed.director_state)
    assert (director.rounds, director.min_envoys, director.target_envoys) == (2, 2, 3)
    assert director.train.local_epochs == 1 and director.model.width == 8
    envoy_model = msgspec.to_builtins(director.model)
    envoy_model.pop("init_seed")
    for index, name in enumerate(fed.names):
        cfg = load_envoy_config(fed.config(name))
        assert cfg.state_dir == str(fed.envoy_state(name)) and cfg.bus_url == fed.broker_url
        assert (cfg.data.partition.index, cfg.data.partition.count) == (index, 3)
        assert cfg.data.limit == 100 and cfg.seed == index + 1
        got = msgspec.to_builtins(cfg.model)
        got.pop("init_seed")
        assert got == envoy_model  # the envoys rebuild the director's network
        creds = _credentials(cfg)
        assert creds.username == name and creds.password and creds.tls_cert and creds.has_curve
        for secret in ("signing.key", "curve.key", "mqtt.password", "tls/client.key"):
            assert stat.S_IMODE((fed.kit(name) / secret).stat().st_mode) == 0o600
    broker = BrokerConfig.load(fed.kit("broker") / "broker.toml")
    assert broker.heartbeat_timeout_s == 6.0 and len(broker.allow) == 4
    conf = (fed.kit("broker") / "mosquitto.conf").read_text()
    port = urlsplit(fed.broker_url).port
    assert f"listener {port} 127.0.0.1" in conf and "require_certificate true" in conf


def test_a_taken_port_means_provisioning_again_before_any_node_runs(tmp_path: Path) -> None:
    fed = federation(tmp_path, "zmq")
    fed.prepare()
    taken = urlsplit(fed.broker_url).port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            url = fed.start_broker()
        finally:
            fed.stop_all()
    assert urlsplit(url).port != taken
    assert load_director_config(fed.config("director")).bus_url == url
    assert load_envoy_config(fed.config("envoy-2")).bus_url == url
