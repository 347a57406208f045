"""`fedbus`: one entry point for every role.

Only argparse and the standard library are imported at the top: `fedbus broker` must start
without torch (the broker is a small service), so each subcommand imports what it needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COMMANDS = (
    "broker",
    "director",
    "envoy",
    "demo",
    "provision",
    "attack",
    "status",
    "export",
    "ui",
)

USAGE = """usage: fedbus COMMAND [options]

commands:
  broker     the ZeroMQ broker daemon (no torch)         fedbus broker --config configs/broker.toml
  director   run the rounds of a federation              fedbus director --config configs/director.toml [--resume]
  envoy      a hospital's node                           fedbus envoy --config configs/envoy.toml
  demo       a whole federation on this machine          fedbus demo [--envoys 5] [--rounds N] [--data PATH] ...
  provision  keys, configs and ACLs for a federation     fedbus provision --federation NAME --envoys a,b,c --out kits/
  attack     gradient-inversion attacks vs the defences  fedbus attack [--defense ...] [--attack ...]
  status     progress of a running director              fedbus status STATE_DIR | --config director.toml
  export     the model, its threshold and a model card   fedbus export STATE_DIR [--best] --format safetensors|onnx|torchscript
  ui         the read-only operator page of a director   fedbus ui STATE_DIR [--bind 127.0.0.1:8080]

`fedbus COMMAND --help` for the options of each command."""


def _load_fault_plan(path: str | Path | None) -> Any:
    """The fault plan at `path` (None without one); ValueError names the file and field."""
    if not path:
        return None
    from broker.faults import FaultPlan

    return FaultPlan.load(path)  # FaultPlanError is a ValueError


def _credentials(cfg: Any) -> Any:
    """broker.client.Credentials from a config's [credentials] file paths."""
    from broker.client import Credentials
    from broker.keys import curve_public_key, read_key_file

    c = cfg.credentials

    def curve_key(path: str | None, field: str) -> str | None:
        return read_key_file(path, encoding="z85", field=field) if path else None

    secret = curve_key(c.curve_secret_key, "curve_secret_key")
    public = curve_key(c.curve_public_key, "curve_public_key")
    if secret and not public:
        public = curve_public_key(secret)
    broker = curve_key(c.broker_public_key, "broker_public_key")
    password = Path(c.password_file).read_text().strip() if c.password_file else None
    return Credentials(
        curve_secret_key=secret,
        curve_public_key=public,
        broker_public_key=broker,
        username=c.username,
        password=password,
        tls_ca=c.tls_ca,
        tls_cert=c.tls_cert,
        tls_key=c.tls_key,
    )


def _faulty(bus: Any, plan: Any, node_id: str, started_at: float | None) -> Any:
    """Wrap the bus in the fault plan's link faults / partitions for this node, if any."""
    if plan is None:
        return bus
    if plan.link_for(node_id) is None and not plan.ever_partitioned(node_id):
        return bus
    from broker.faults import FaultyBus

    return FaultyBus(bus, plan, node_id, started_at=started_at)


def _run_async(coro_factory: Any) -> int:
    """Run the node; SIGTERM/SIGINT cancel it cleanly (exit code 130/143)."""
    import asyncio
    import signal

    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        got: list[int] = []

        def on_signal(signum: int) -> None:
            got.append(signum)
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await coro_factory()
        except asyncio.CancelledError:
            return 128 + (got[0] if got else signal.SIGTERM)

    return asyncio.run(main())


# -- director -------------------------------------------------------------------------------


def director_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="fedbus director", description="Run a federation's rounds.")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--faults", type=Path, help='fault plan TOML (link faults of node "*")')
    p.add_argument("--faults-start", type=float, help="wall-clock origin of partition windows")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)

    import msgspec

    from node.config import load_director_config
    from node.logs import setup_logging
    from protocol.configfile import ConfigError

    try:
        cfg = load_director_config(args.config)
        if args.rounds is not None:
            cfg = msgspec.structs.replace(cfg, rounds=args.rounds)
        credentials = None if cfg.insecure_no_auth else _credentials(cfg)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"fedbus director: {exc}", file=sys.stderr)
        return 2
    log = setup_logging(cfg.node_id)
    try:
        plan = _load_fault_plan(args.faults)
    except ValueError as exc:
        print(f"fedbus director: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        from broker.client import BusError, connect
        from node.director import Director
        from node.errors import FedbusError

        try:
            bus = await connect(
                cfg.bus_url,
                node_id=cfg.node_id,
                role="director",
                credentials=credentials,
                max_frame_bytes=cfg.max_frame_bytes,
                insecure_no_auth=cfg.insecure_no_auth,
            )
        except (BusError, ValueError) as exc:
            log.error("bus_connect_failed", reason=str(exc))
            return 3
        outer = _faulty(bus, plan, cfg.node_id, args.faults_start)
        try:
            return await Director(cfg, outer, resume=args.resume).run()
        except FedbusError as exc:
            # Quorum lost, an unusable state folder, ...: the documented code, the reason.
            log.error("director_failed", reason=str(exc), exit_code=int(exc.exit_code))
            print(f"fedbus director: {exc}", file=sys.stderr)
            return int(exc.exit_code)
        finally:
            await bus.close()

    return _run_async(run)


# -- envoy ----------------------------------------------------------------------------------


def envoy_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="fedbus envoy", description="Run a hospital's envoy.")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--faults", type=Path, help="fault plan TOML (crashes, link faults)")
    p.add_argument("--faults-start", type=float, help="wall-clock origin of partition windows")
    p.add_argument("--audit", action="store_true", help="keep quantised updates in STATE_DIR/audit")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)

    import msgspec

    from node.config import load_envoy_config
    from node.logs import setup_logging
    from protocol.configfile import ConfigError

    try:
        cfg = load_envoy_config(args.config)
        if args.audit:
            cfg = msgspec.structs.replace(cfg, audit=True)
        if args.faults:
            cfg = msgspec.structs.replace(cfg, faults=str(args.faults))
        credentials = None if cfg.insecure_no_auth else _credentials(cfg)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"fedbus envoy: {exc}", file=sys.stderr)
        return 2
    log = setup_logging(cfg.node_id)
    try:
        plan = _load_fault_plan(cfg.faults)
    except ValueError as exc:
        print(f"fedbus envoy: {exc}", file=sys.stderr)
        return 2
    try:
        from node.trainer import LocalData, TorchTrainer, load_local_data
        from node.training.data import DataUnavailable

        data: LocalData = load_local_data(cfg)
    except (DataUnavailable, ValueError, OSError) as exc:
        print(f"fedbus envoy: data: {exc}", file=sys.stderr)
        return 2
    log.info("data_loaded", train=len(data.train_labels), val=len(data.val_labels))
    trainer = TorchTrainer(cfg, data)

    async def run() -> int:
        from broker.client import BusError, connect
        from node.envoy import Envoy

        envoy = Envoy(cfg, None, trainer, fault_plan=plan)  # type: ignore[arg-type]
        try:
            bus = await connect(
                cfg.bus_url,
                node_id=cfg.node_id,
                role="envoy",
                credentials=credentials,
                will=envoy.will(),
                max_frame_bytes=cfg.max_frame_bytes,
                insecure_no_auth=cfg.insecure_no_auth,
            )
        except (BusError, ValueError) as exc:
            log.error("bus_connect_failed", reason=str(exc))
            return 3
        outer = _faulty(bus, plan, cfg.node_id, args.faults_start)
        envoy.attach(outer)
        try:
            return await envoy.run()
        finally:
            await outer.close()

    return _run_async(run)


# -- status ---------------------------------------------------------------------------------


def status_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="fedbus status", description="Progress of a director.")
    p.add_argument("state_dir", nargs="?", type=Path, help="the director's state_dir")
    p.add_argument("--config", type=Path, help="the director's config (to find its state_dir)")
    p.add_argument("--json", action="store_true", help="print status.json as is")
    args = p.parse_args(argv)
    from node.status import format_status, read_status

    state_dir = args.state_dir
    if state_dir is None:
        if args.config is None:
            p.error("give STATE_DIR or --config")
        from node.config import load_director_config
        from protocol.configfile import ConfigError

        try:
            state_dir = Path(load_director_config(args.config).state_dir)
        except ConfigError as exc:
            print(f"fedbus status: {exc}", file=sys.stderr)
            return 2
    try:
        status, records = read_status(state_dir)
    except FileNotFoundError as exc:
        print(f"fedbus status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps(status, indent=1))
    else:
        print(format_status(status, records))
    return 0


# -- dispatch -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "broker":
        from broker.server.daemon import main as broker_main

        return broker_main(rest)
    if command == "director":
        return director_main(rest)
    if command == "envoy":
        return envoy_main(rest)
    if command == "demo":
        from node.demo.cli import main as demo_main

        return demo_main(rest)
    if command == "provision":
        from node.provision import main as provision_main

        return provision_main(rest)
    if command == "attack":
        from node.attack import main as attack_main

        return attack_main(rest)
    if command == "status":
        return status_main(rest)
    if command == "export":
        from node.export import main as export_main

        return export_main(rest)
    if command == "ui":
        from node.ui.server import main as ui_main

        return ui_main(rest)
    print(f"fedbus: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
