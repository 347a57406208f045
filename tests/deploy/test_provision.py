"""`fedbus provision`: the kits' contents, their secrecy, re-runs, and kits that really work."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.client.bus import BusError
from broker.client.connect import connect
from broker.client.credentials import Credentials
from broker.files import read_toml
from broker.keys import read_key_file
from broker.server.config import BrokerConfig, BrokerFile
from broker.server.mosquitto_files import AclFile, parse_passwd, verify_password
from broker.server.mosquitto_process import MosquittoProcess
from broker.server.ports import free_port
from broker.topics import Topics
from crypto.signing import sign, signing_public_key, verify
from node.cli import _credentials
from node.cli import main as fedbus
from node.config import load_director_config, load_envoy_config
from node.pki import cert_fingerprint
from node.provision import ProvisionError, update_config
from node.provision import main as provision
from node.trainer import load_local_data
from protocol.configfile import convert_config
from tests.datafiles import KERMANY_SAMPLE
from tests.deploy.identities import public_keys_of

REPO = Path(__file__).resolve().parents[2]
PRIVATE = ["signing.key", "curve.key", "mqtt.password", "tls/client.key"]


def run(out: Path, *args: str, envoys: str = "a,b,c", federation: str = "hosp") -> int:
    """provision, after each envoy to add made its keys (here: in its kit folder)."""
    keys = public_keys_of(out, envoys.split(",")) if "--remove" not in args else []
    argv = ["--federation", federation, "--envoys", envoys, "--out", str(out), *args, *keys]
    return provision(argv)


@pytest.fixture
def kits(tmp_path: Path) -> Path:
    out = tmp_path / "kits"
    assert run(out, "--transport", "mqtt") == 0
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_node_gets_a_complete_private_kit(kits: Path) -> None:
    for node in ("director", "a", "b", "c"):
        kit = kits / node
        assert mode(kit) == 0o700
        for name in PRIVATE:
            assert mode(kit / name) == 0o600, f"{node}/{name}"
        for name in ("signing.pub", "curve.pub", "broker.pub", "tls/ca.crt", "tls/client.crt"):
            assert (kit / name).is_file(), f"{node}/{name}"
    for name in ("broker.key", "tls/server.key", "mosquitto.passwd", "mosquitto.conf"):
        assert mode(kits / "broker" / name) == 0o600
    assert mode(kits / "ca" / "ca.key") == 0o600
    # The CA key is the operator's: no node kit holds it.
    ca_key = (kits / "ca" / "ca.key").read_bytes()
    for path in kits.rglob("*"):
        if path.is_file() and path.parent.name != "ca":
            assert path.read_bytes() != ca_key
    assert not list(kits.rglob("*.tmp"))


def test_configs_load_and_point_at_the_kit(kits: Path) -> None:
    director = load_director_config(kits / "director" / "director.toml")
    assert director.federation == "hosp"
    assert director.bus_url == "mqtts://127.0.0.1:8883"
    # Secure aggregation: the director holds every envoy's signing public key.
    assert set(director.envoy_signing_keys) == {"a", "b", "c"}
    for envoy, path in director.envoy_signing_keys.items():
        private = read_key_file(kits / envoy / "signing.key")
        assert read_key_file(path) == signing_public_key(private)
    for envoy in ("a", "b", "c"):
        cfg = load_envoy_config(kits / envoy / "envoy.toml")
        assert cfg.node_id == envoy and cfg.federation == "hosp"
        assert set(cfg.peer_signing_keys) == {"a", "b", "c"}
        director_public = read_key_file(cfg.director_signing_key)  # type: ignore[arg-type]
        message = b"round 1"
        verify(
            director_public,
            message,
            sign(read_key_file(kits / "director" / "signing.key"), message),
        )
        creds = _credentials(cfg)
        assert creds.username == envoy and creds.password
        assert creds.tls_ca and Path(creds.tls_ca).is_file()
        assert creds.has_curve


def test_broker_kit_matches_the_nodes(kits: Path) -> None:
    config = BrokerConfig.load(kits / "broker" / "broker.toml")
    allowed = {identity.node_id: key for key, identity in config.allow.items()}
    assert set(allowed) == {"director", "a", "b", "c"}
    import zmq

    for node, public in allowed.items():
        secret = (kits / node / "curve.key").read_text().strip()
        assert zmq.curve_public(secret.encode()).decode() == public
    entries = parse_passwd((kits / "broker" / "mosquitto.passwd").read_text())
    for node in allowed:
        password = (kits / node / "mqtt.password").read_text().strip()
        assert verify_password(entries[node], password)
    acl = AclFile.parse((kits / "broker" / "mosquitto.acl").read_text())
    topics = Topics("hosp")
    assert acl.allows("a", "write", topics.director)
    assert not acl.allows("a", "read", topics.envoy("b"))


def test_certificates_chain_to_the_federation_ca(kits: Path) -> None:
    ca = x509.load_pem_x509_certificate((kits / "ca" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((kits / "broker" / "tls" / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    for node in ("director", "a"):
        cert = x509.load_pem_x509_certificate((kits / node / "tls" / "client.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == node
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    server.verify_directly_issued_by(ca)


def _secrets(out: Path) -> dict[str, bytes]:
    found = {}
    for path in sorted(out.rglob("*")):
        if (
            path.is_file()
            and mode(path) == 0o600
            and path.name not in ("mosquitto.passwd", "mosquitto.conf", "mosquitto.acl")
        ):
            found[str(path.relative_to(out))] = path.read_bytes()
    return found


def test_rerun_adds_envoys_without_rotating_any_key(kits: Path) -> None:
    before = _secrets(kits)
    envoy_a = kits / "a" / "envoy.toml"
    edited = envoy_a.read_text().replace("data/pneumoniamnist.npz", "/srv/xray/hospital-a.npz")
    envoy_a.write_text(edited)
    assert run(kits, "--transport", "mqtt", envoys="d") == 0
    after = _secrets(kits)
    for name, data in before.items():
        assert after[name] == data, f"{name} was rotated"
    assert {name.split("/")[0] for name in set(after) - set(before)} == {"d"}
    director = load_director_config(kits / "director" / "director.toml")
    assert set(director.envoy_signing_keys) == {"a", "b", "c", "d"}
    assert director.target_envoys == 4
    a = load_envoy_config(envoy_a)
    assert set(a.peer_signing_keys) == {"a", "b", "c", "d"}
    assert a.data.path == "/srv/xray/hospital-a.npz"  # the hospital's own edit survives
    roster = tomllib.loads((kits / "roster.toml").read_text())
    assert set(roster["nodes"]) == {"director", "a", "b", "c", "d"}
    assert roster["broker"]["curve_public_key"] == (kits / "d" / "broker.pub").read_text().strip()
    for node in ("a", "d"):
        pem = (kits / node / "tls" / "client.crt").read_bytes()
        assert roster["nodes"][node]["tls_cert_sha256"] == cert_fingerprint(pem)
    assert "d" in parse_passwd((kits / "broker" / "mosquitto.passwd").read_text())
    assert "d" in {
        i.node_id for i in BrokerConfig.load(kits / "broker" / "broker.toml").allow.values()
    }


def test_rerun_for_another_federation_is_refused(
    kits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(kits, federation="other") == 2
    assert "federation 'hosp'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override",
    [
        {"--envoys": "a,a/b"},
        {"--envoys": "director"},
        {"--envoys": "broadcast"},
        {"--port": "70000"},
        {"--broker-host": "has space"},
        {"--federation": "no spaces allowed"},
    ],
)
def test_bad_arguments_are_refused_before_writing(tmp_path: Path, override: dict[str, str]) -> None:
    out = tmp_path / "kits"
    options = {"--federation": "hosp", "--envoys": "a", "--out": str(out), **override}
    assert provision([part for item in options.items() for part in item]) == 2
    assert not (out / "roster.toml").exists()


async def test_mqtt_kits_work_with_the_real_broker(tmp_path: Path) -> None:
    """Mosquitto from the broker kit, nodes from their kits' configs, over TLS."""
    out = tmp_path / "kits"
    port = free_port()
    user = ["--mosquitto-user", "root"] if os.geteuid() == 0 else []
    argv = ["--transport", "mqtt", "--port", str(port), "--bind-address", "127.0.0.1", *user]
    assert run(out, *argv) == 0
    broker = MosquittoProcess(out / "broker" / "mosquitto.conf", (port,))
    with broker:
        director_cfg = load_director_config(out / "director" / "director.toml")
        envoy_cfg = load_envoy_config(out / "b" / "envoy.toml")
        director = await connect(
            director_cfg.bus_url,
            node_id="director",
            role="director",
            credentials=_credentials(director_cfg),
        )
        envoy = await connect(
            envoy_cfg.bus_url, node_id="b", role="envoy", credentials=_credentials(envoy_cfg)
        )
        try:
            topics = Topics("hosp")
            inbox = director.subscribe(topics.director)
            mine = envoy.subscribe(topics.envoy("b"))
            await asyncio.gather(inbox.ready(), mine.ready())
            await envoy.publish(topics.director, b"hello from b")
            await director.publish(topics.envoy("b"), b"hello b")
            assert await anext(inbox) == b"hello from b"
            assert await anext(mine) == b"hello b"
        finally:
            await envoy.close()
            await director.close()


async def test_zmq_kits_work_with_the_real_broker_daemon(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    port = free_port()
    assert run(out, "--port", str(port), "--bind-address", "127.0.0.1") == 0
    ready = tmp_path / "ready"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node.cli",
            "broker",
            "--config",
            str(out / "broker" / "broker.toml"),
            "--ready-file",
            str(ready),
        ],
        cwd=REPO,
    )
    try:
        while not ready.exists():
            assert daemon.poll() is None
            await asyncio.sleep(0.05)
        director_cfg = load_director_config(out / "director" / "director.toml")
        envoy_cfg = load_envoy_config(out / "c" / "envoy.toml")
        assert envoy_cfg.bus_url == f"zmq+tcp://127.0.0.1:{port}"
        director = await connect(
            director_cfg.bus_url,
            node_id="director",
            role="director",
            credentials=_credentials(director_cfg),
        )
        envoy = await connect(
            envoy_cfg.bus_url, node_id="c", role="envoy", credentials=_credentials(envoy_cfg)
        )
        try:
            topics = Topics("hosp")
            inbox = director.subscribe(topics.director)
            await inbox.ready()
            await envoy.publish(topics.director, b"hello from c")
            assert await anext(inbox) == b"hello from c"
        finally:
            await envoy.close()
            await director.close()
    finally:
        daemon.terminate()
        daemon.wait()


def test_configs_mosquitto_examples_are_what_provision_writes(tmp_path: Path) -> None:
    """configs/mosquitto/*.example are the files of a real systemd deployment, kept in sync."""
    out = tmp_path / "kits"
    argv = [
        "--transport", "mqtt",
        "--install-root", "/etc/fedbus",
        "--state-root", "/var/lib/fedbus",
        "--mosquitto-user", "fedbus",
    ]  # fmt: skip
    assert run(out, *argv, envoys="hospital-a,hospital-b,hospital-c", federation="pneumonia") == 0
    examples = REPO / "configs" / "mosquitto"
    for name in ("mosquitto.conf", "mosquitto.acl"):
        assert (out / "broker" / name).read_text() == (examples / f"{name}.example").read_text()


def test_remove_takes_an_envoy_out_everywhere(kits: Path) -> None:
    before = _secrets(kits)
    serial = x509.load_pem_x509_certificate(
        (kits / "b" / "tls" / "client.crt").read_bytes()
    ).serial_number
    assert run(kits, "--transport", "mqtt", "--remove", "b", envoys="") == 0
    assert not (kits / "b").exists()
    assert len(list((kits / "removed").glob("b-*"))) == 1
    director = load_director_config(kits / "director" / "director.toml")
    assert set(director.envoy_signing_keys) == {"a", "c"}
    assert set(load_envoy_config(kits / "a" / "envoy.toml").peer_signing_keys) == {"a", "c"}
    assert not (kits / "a" / "peers" / "b.sign.pub").exists()
    assert "b" not in parse_passwd((kits / "broker" / "mosquitto.passwd").read_text())
    assert "user b" not in (kits / "broker" / "mosquitto.acl").read_text()
    allowed = {i.node_id for i in BrokerConfig.load(kits / "broker" / "broker.toml").allow.values()}
    assert allowed == {"director", "a", "c"}
    crl = x509.load_pem_x509_crl((kits / "broker" / "tls" / "crl.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((kits / "ca" / "ca.crt").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    # Nobody else's keys changed.
    after = _secrets(kits)
    for name, data in before.items():
        if not name.startswith("b/"):
            assert after[name] == data, name
    # The same id again is a new envoy: fresh keys, not the revoked ones.
    assert run(kits, "--transport", "mqtt", envoys="b") == 0
    fresh = x509.load_pem_x509_certificate((kits / "b" / "tls" / "client.crt").read_bytes())
    assert fresh.serial_number != serial
    assert (kits / "b" / "signing.key").read_bytes() != before["b/signing.key"]


def test_remove_refuses_unknown_envoys(kits: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(kits, "--remove", "zz", envoys="") == 2
    assert "not an envoy" in capsys.readouterr().err
    assert run(kits, "--remove", "director", envoys="") == 2


async def test_mosquitto_refuses_a_revoked_certificate(tmp_path: Path) -> None:
    """After --remove, the broker refuses the removed node's certificate at the TLS handshake,
    even presented with another node's valid password."""
    out = tmp_path / "kits"
    port = free_port()
    user = ["--mosquitto-user", "root"] if os.geteuid() == 0 else []
    argv = ["--transport", "mqtt", "--port", str(port), "--bind-address", "127.0.0.1", *user]
    assert run(out, *argv) == 0
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    for name in ("client.crt", "client.key"):
        (stolen / name).write_bytes((out / "b" / "tls" / name).read_bytes())

    def chimera() -> Credentials:
        # a's login with b's certificate: the certificate alone decides here.
        return Credentials(
            username="a",
            password=(out / "a" / "mqtt.password").read_text().strip(),
            tls_ca=str(out / "ca" / "ca.crt"),
            tls_cert=str(stolen / "client.crt"),
            tls_key=str(stolen / "client.key"),
        )

    url = f"mqtts://127.0.0.1:{port}"
    with MosquittoProcess(out / "broker" / "mosquitto.conf", (port,)):
        bus = await connect(url, node_id="a", role="envoy", credentials=chimera())
        await bus.close()  # b's certificate is valid before the removal
    assert run(out, *argv, "--remove", "b", envoys="") == 0
    with (
        MosquittoProcess(out / "broker" / "mosquitto.conf", (port,)),
        pytest.raises(BusError, match=r"(?i)revoked|certificate"),
    ):
        await connect(url, node_id="a", role="envoy", credentials=chimera(), timeout_s=20)


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "remove"]),
            st.sets(st.sampled_from("pqrst"), min_size=1, max_size=2),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_sequence_of_adds_and_removes_keeps_the_kits_consistent(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, set[str]]]
) -> None:
    out = tmp_path_factory.mktemp("seq") / "kits"
    assert run(out, envoys="a") == 0
    members = {"a"}
    keys = {"a": (out / "a" / "signing.key").read_bytes()}
    for op, ids in steps:
        if op == "add":
            assert run(out, envoys=",".join(sorted(ids))) == 0
            members |= ids
        else:
            rc = run(out, "--remove", ",".join(sorted(ids)), envoys="")
            if not ids <= members or members == ids:
                assert rc == 2  # unknown envoy, or nobody left: refused, nothing changed
                continue
            assert rc == 0
            members -= ids
            for gone in ids:
                keys.pop(gone, None)
        for envoy in members:
            keys.setdefault(envoy, (out / envoy / "signing.key").read_bytes())
        # Invariants: the roster, every allow-list and every peer list are exactly `members`,
        # and no kept envoy's key ever changed.
        roster = tomllib.loads((out / "roster.toml").read_text())
        assert {n for n, v in roster["nodes"].items() if v["role"] == "envoy"} == members
        director = load_director_config(out / "director" / "director.toml")
        assert set(director.envoy_signing_keys) == members
        allowed = {
            i.node_id for i in BrokerConfig.load(out / "broker" / "broker.toml").allow.values()
        }
        assert allowed == members | {"director"}
        assert set(parse_passwd((out / "broker" / "mosquitto.passwd").read_text())) == members | {
            "director"
        }
        for envoy in members:
            assert set(load_envoy_config(out / envoy / "envoy.toml").peer_signing_keys) == members
            assert (out / envoy / "signing.key").read_bytes() == keys[envoy]


def test_update_config_merges_validates_and_refuses_without_writing(kits: Path) -> None:
    path = kits / "a" / "envoy.toml"
    update_config(path, "envoy", {"heartbeat_s": 0.5, "data": {"partition": {"alpha": 0.3}}})
    cfg = load_envoy_config(path)
    assert cfg.heartbeat_s == 0.5 and cfg.data.partition.alpha == 0.3
    # Nested tables merge key by key: what provision wrote next to the change stays.
    assert cfg.data.partition.index == 0 and cfg.data.partition.count == 3
    assert cfg.bus_url == "mqtts://127.0.0.1:8883"
    before = path.read_bytes()
    with pytest.raises(ProvisionError, match="heartbeat_s"):
        update_config(path, "envoy", {"heartbeat_s": -1.0})
    with pytest.raises(ProvisionError, match="colour"):
        update_config(path, "envoy", {"colour": "blue"})
    assert path.read_bytes() == before
    assert mode(path) == 0o644


def test_broker_toml_is_the_schema_written_back(kits: Path) -> None:
    """provision writes broker.toml from BrokerFile via dump_toml: it reads back equal."""
    text = (kits / "broker" / "broker.toml").read_text()
    doc = convert_config(tomllib.loads(text), BrokerFile, source="broker.toml")
    assert [(a.node_id, a.role, a.public_key_file) for a in doc.allow] == [
        ("director", "director", "keys/director.pub"),
        *((e, "envoy", f"keys/{e}.pub") for e in ("a", "b", "c")),
    ]
    assert doc.bind == "tcp://0.0.0.0:5555" and doc.secret_key_file == "broker.key"


def test_an_image_folder_kit_trains_on_all_of_the_hospitals_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kits"
    assert run(out, "--data", str(KERMANY_SAMPLE), envoys="a,b") == 0
    for envoy in ("a", "b"):
        path = out / envoy / "envoy.toml"
        assert "partition" not in path.read_text()
        cfg = load_envoy_config(path)
        assert cfg.data.source == "image_folder" and cfg.data.partition is None
        data = load_local_data(cfg)
        assert len(data.train.labels) + len(data.val.labels) == 16  # every image, both envoys
        # The deployment guide's check: the hospital sees what its envoy would train on.
        capsys.readouterr()
        assert fedbus(["envoy", "--config", str(path), "--check"]) == 0
        said = capsys.readouterr().out
        assert "all of it (no partition)" in said and "config, keys and data are usable" in said
        assert f"train {len(data.train.labels)} images" in said
    # A .npz is one shared file: each envoy of the simulated federation gets its own part.
    npz = tmp_path / "npz"
    assert run(npz, envoys="a,b") == 0
    parts = [load_envoy_config(npz / e / "envoy.toml").data.partition for e in ("a", "b")]
    assert [(p.scheme, p.index, p.count) for p in parts if p] == [
        ("dirichlet", 0, 2),
        ("dirichlet", 1, 2),
    ]
    # --data-source overrides the guess from the name.
    forced = tmp_path / "forced"
    assert run(forced, "--data", "/srv/x.npz", "--data-source", "image_folder", envoys="a") == 0
    assert load_envoy_config(forced / "a" / "envoy.toml").data.source == "image_folder"


def test_kits_start_from_the_shipped_director_template(kits: Path) -> None:
    template = read_toml(REPO / "configs" / "director.toml")
    director = read_toml(kits / "director" / "director.toml")
    for table in ("train", "lr_schedule", "model", "secagg", "deadlines"):
        assert director[table] == template[table], table


# -- issue #11, point 7: key custody ---------------------------------------------------------


def test_7_the_operators_kits_never_hold_an_envoys_secret(tmp_path: Path) -> None:
    """Each hospital runs `fedbus envoy init` on its own host and hands over the public half;
    the operator's kits (what provision writes) hold no envoy key at all, and the kit plus the
    hospital's own folder make a working envoy."""
    hospitals = tmp_path / "hospitals"
    bundles = []
    for name in ("a", "b"):
        result = subprocess.run(
            [sys.executable, "-m", "node.cli", "envoy", "init", "--node-id", name,
             "--out", str(hospitals / name)],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "fingerprint:" in result.stdout and str(hospitals / name) in result.stdout
        bundles.append(str(hospitals / name / f"{name}.public.toml"))
        assert mode(hospitals / name) == 0o700
        for secret in PRIVATE:
            assert mode(hospitals / name / secret) == 0o600
    out = tmp_path / "operator" / "kits"
    argv = ["--federation", "hosp", "--envoys", "a,b", "--out", str(out), "--public-keys"]
    assert provision([*argv, *bundles]) == 0
    for name in ("a", "b"):
        kit = out / name
        for secret in PRIVATE:
            assert not (kit / secret).exists(), f"{name}/{secret}"
        secrets = [(hospitals / name / s).read_bytes() for s in PRIVATE]
        for path in out.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(s.strip() and s.strip() in data for s in secrets), path
        # The certificate certifies the hospital's own TLS key.
        cert = x509.load_pem_x509_certificate((kit / "tls" / "client.crt").read_bytes())
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(
            (hospitals / name / "tls" / "client.key").read_bytes(), None
        )
        assert cert.public_key() == key.public_key()  # type: ignore[union-attr]
        # Installed over the hospital's folder, the kit's config finds the hospital's keys.
        for path in kit.rglob("*"):
            if path.is_file():
                target = hospitals / name / path.relative_to(kit)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
        cfg = load_envoy_config(hospitals / name / "envoy.toml")
        assert read_key_file(cfg.signing_key).hex() != ""  # type: ignore[arg-type]
        director = load_director_config(out / "director" / "director.toml")
        assert read_key_file(director.envoy_signing_keys[name]) == signing_public_key(
            read_key_file(cfg.signing_key)  # type: ignore[arg-type]
        )


def test_7_an_envoy_without_public_keys_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kits"
    assert provision(["--federation", "hosp", "--envoys", "a", "--out", str(out)]) == 2
    assert "fedbus envoy init" in capsys.readouterr().err
    assert not (out / "roster.toml").exists() and not (out / "a" / "signing.key").exists()


@pytest.mark.parametrize("lost", ["director/signing.key", "broker/broker.key", "ca/ca.key"])
def test_7_a_lost_secret_is_never_silently_recreated(
    kits: Path, lost: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Old code: a missing kit was re-created with a new identity pushed to every peer."""
    roster = (kits / "roster.toml").read_bytes()
    (kits / lost).unlink()
    assert run(kits, "--transport", "mqtt") == 2
    assert "missing" in capsys.readouterr().err
    assert not (kits / lost).exists()
    assert (kits / "roster.toml").read_bytes() == roster


def test_7_another_key_under_a_known_envoys_name_is_refused(
    kits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone hands over a bundle for "a" made elsewhere: not accepted in place of a's keys."""
    from node.identity import init_identity, public_file

    impostor = init_identity(tmp_path / "impostor", "a")
    assert impostor.signing_public_key != (kits / "a" / "signing.pub").read_text().strip()
    argv = ["--federation", "hosp", "--envoys", "a", "--out", str(kits), "--transport", "mqtt"]
    assert provision([*argv, "--public-keys", str(public_file(tmp_path / "impostor", "a"))]) == 2
    assert "never replaced silently" in capsys.readouterr().err
    director = load_director_config(kits / "director" / "director.toml")
    assert read_key_file(director.envoy_signing_keys["a"]) == signing_public_key(
        read_key_file(kits / "a" / "signing.key")
    )


def test_7_envoy_init_keeps_its_keys_when_run_again(tmp_path: Path) -> None:
    from node.identity import init_identity, read_public_identity

    first = init_identity(tmp_path / "e", "e")
    keys = {s: (tmp_path / "e" / s).read_bytes() for s in PRIVATE}
    again = init_identity(tmp_path / "e", "e")
    assert again == first and again.fingerprint == first.fingerprint
    assert {s: (tmp_path / "e" / s).read_bytes() for s in PRIVATE} == keys
    assert read_public_identity(tmp_path / "e" / "e.public.toml") == first
