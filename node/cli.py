"""`fedbus`: one entry point for every role, and the conventions every command shares.

    fedbus [--version] [--log-level LEVEL] COMMAND [options]

Only the standard library and node.errors/node.logs (structlog) are imported at the top:
`fedbus broker` must start without torch (the broker is a small service), so each command
imports what it needs. `main` is the one place where a command's errors become exit
statuses (`exit_code_for`, the README's "Exit codes" table) and where logging is set up
(`--log-level`, anywhere on the line, else $FEDBUS_LOG_LEVEL; JSON lines on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from node.errors import ExitCode, FedbusError
from node.logs import LEVELS, LOG_LEVEL_ENV, configure_logging, resolve_level, set_node

USAGE = f"""usage: fedbus [--version] [--log-level LEVEL] COMMAND [options]

commands:
  broker     the ZeroMQ broker daemon (no torch)         fedbus broker --config configs/broker.toml
  director   run the rounds of a federation              fedbus director --config configs/director.toml [--resume]
  envoy      a hospital's node                           fedbus envoy --config configs/envoy.toml
             its keys, made on its own host              fedbus envoy init --node-id ID --out DIR
  demo       a whole federation on this machine          fedbus demo [--envoys 5] [--rounds N] [--data PATH] ...
  provision  kits from the envoys' public keys           fedbus provision --federation NAME --envoys a,b,c --public-keys DIR --out kits/
  attack     gradient-inversion attacks vs the defences  fedbus attack [--defense ...] [--attack ...]
  status     progress of a running director              fedbus status STATE_DIR | --config director.toml
  export     the model, its threshold and a model card   fedbus export STATE_DIR [--best] --format safetensors|onnx|torchscript
  ui         the read-only operator page of a director   fedbus ui STATE_DIR [--bind 127.0.0.1:8080]

options (every command):
  --log-level LEVEL  {"|".join(LEVELS)} (default: ${LOG_LEVEL_ENV}, else info); logs are
                     JSON lines on stderr
  --version          print fedbus's version and exit

`fedbus COMMAND --help` for the options of each command. Exit statuses: see the README."""


class UsageError(FedbusError):
    """Bad arguments to `fedbus` itself (before the command's own parser runs)."""

    exit_code = ExitCode.USAGE


class NoStatus(FedbusError):
    """`fedbus status`: the state folder holds no status of a director."""

    exit_code = ExitCode.STATE


def exit_code_for(exc: BaseException) -> ExitCode | None:
    """The exit status of a command that raised `exc`; None for an unexpected error (a bug),
    which ends with its traceback and status 1."""
    from broker.client.bus import BusError
    from broker.keys import KeyFileError
    from broker.server.daemon import ListenError
    from protocol.configfile import ConfigError

    if isinstance(exc, FedbusError):
        return exc.exit_code
    if isinstance(exc, (ConfigError, KeyFileError)):  # fault plans are ConfigErrors too
        return ExitCode.CONFIG
    if isinstance(exc, (BusError, ListenError)):
        return ExitCode.BUS_UNREACHABLE
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return None


def _load_fault_plan(path: str | Path | None) -> Any:
    """The fault plan at `path` (None without one); ValueError names the file and field."""
    if not path:
        return None
    from broker.faults import FaultPlan

    return FaultPlan.load(path)  # FaultPlanError is a ConfigError


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


def _config_error(path: Path, exc: Exception) -> Exception:
    """A config (or a file it names) that cannot be read, as a ConfigError naming the file."""
    from protocol.configfile import ConfigError

    if isinstance(exc, ConfigError):
        return exc
    return ConfigError(f"{path}: {exc}")


async def _connect(
    cfg: Any, config_path: Path, *, role: str, credentials: Any, will: Any = None
) -> Any:
    """The node's bus; BusError (exit status BUS_UNREACHABLE) when the broker does not
    answer or refuses us, ConfigError for a URL or credentials the transport cannot use."""
    from broker.client import connect

    try:
        return await connect(
            cfg.bus_url,
            node_id=cfg.node_id,
            role=role,
            credentials=credentials,
            will=will,
            max_frame_bytes=cfg.max_frame_bytes,
            insecure_no_auth=cfg.insecure_no_auth,
        )
    except ValueError as exc:
        raise _config_error(config_path, exc) from None


# -- director -------------------------------------------------------------------------------


def director_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="fedbus director", description="Run a federation's rounds.")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--faults", type=Path, help='fault plan TOML (link faults of node "*")')
    p.add_argument("--faults-start", type=float, help="wall-clock origin of partition windows")
    args = p.parse_args(argv)

    import msgspec

    from node.config import load_director_config

    try:
        cfg = load_director_config(args.config)
        if args.rounds is not None:
            cfg = msgspec.structs.replace(cfg, rounds=args.rounds)
        credentials = None if cfg.insecure_no_auth else _credentials(cfg)
    except (ValueError, OSError) as exc:
        raise _config_error(args.config, exc) from None
    set_node(cfg.node_id)
    plan = _load_fault_plan(args.faults)

    async def run() -> int:
        from node.director import Director
        from node.logs import get_logger

        bus = await _connect(cfg, args.config, role="director", credentials=credentials)
        outer = _faulty(bus, plan, cfg.node_id, args.faults_start)
        try:
            return await Director(cfg, outer, resume=args.resume).run()
        except FedbusError as exc:
            # Quorum lost, an unusable state folder, ...: an event for harnesses reading the
            # log; main() prints the reason and returns the documented code.
            get_logger().error("director_failed", reason=str(exc), exit_code=int(exc.exit_code))
            raise
        finally:
            await outer.close()  # the fault wrapper's delayed frames first, then the bus

    return _run_async(run)


# -- envoy ----------------------------------------------------------------------------------


def envoy_main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "init":
        from node.identity import main as init_main

        return init_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="fedbus envoy",
        description="Run a hospital's envoy (`fedbus envoy init` makes its keys first).",
    )
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--faults", type=Path, help="fault plan TOML (crashes, link faults)")
    p.add_argument("--faults-start", type=float, help="wall-clock origin of partition windows")
    p.add_argument("--audit", action="store_true", help="keep quantised updates in STATE_DIR/audit")
    p.add_argument(
        "--check",
        action="store_true",
        help="read the config, keys and data, say what the envoy would train on, and exit "
        "without connecting",
    )
    args = p.parse_args(argv)

    import msgspec

    from node.config import load_envoy_config
    from node.logs import get_logger

    try:
        cfg = load_envoy_config(args.config)
        if args.audit:
            cfg = msgspec.structs.replace(cfg, audit=True)
        if args.faults:
            cfg = msgspec.structs.replace(cfg, faults=str(args.faults))
        credentials = None if cfg.insecure_no_auth else _credentials(cfg)
    except (ValueError, OSError) as exc:
        raise _config_error(args.config, exc) from None
    set_node(cfg.node_id)
    log = get_logger()
    plan = _load_fault_plan(cfg.faults)
    from node.localdata import load_local_data
    from node.trainer import make_trainer

    # DataUnavailable, and a factory, loader, trainer, device or data that cannot work
    # (EntryPointError, DataMismatch, DeviceUnavailable): exit status CONFIG.
    data = load_local_data(cfg)
    log.info("data_loaded", train=len(data.train), val=len(data.val))
    trainer, model = make_trainer(cfg, data=data)
    log.info(
        "trainer_ready",
        trainer=f"{type(trainer).__module__}.{type(trainer).__qualname__}",
        model=cfg.model.factory_name,
        loader=cfg.data.loader or cfg.data.source,
        device=cfg.train.device,
    )
    if args.check:
        print(_data_summary(cfg, data))
        return int(ExitCode.OK)

    async def run() -> int:
        from node.envoy import Envoy

        envoy = Envoy(cfg, None, trainer, fault_plan=plan, model=model)
        bus = await _connect(
            cfg, args.config, role="envoy", credentials=credentials, will=envoy.will()
        )
        outer = _faulty(bus, plan, cfg.node_id, args.faults_start)
        envoy.attach(outer)
        try:
            return await envoy.run()  # ModelMismatchError: exit status CONFIG
        finally:
            await outer.close()

    return _run_async(run)


def _data_summary(cfg: Any, data: Any) -> str:
    """`fedbus envoy --check`: what this envoy trains and validates on, in one paragraph."""
    import numpy as np

    from node.training.batches import dataset_labels

    part = cfg.data.partition
    share = (
        "all of it (no partition)"
        if part is None or part.scheme == "folder"
        else f"part {part.index} of {part.count} ({part.scheme})"
    )
    bundled_names = ("normal", "pneumonia") if cfg.data.loader is None else None
    names = cfg.model.classes or data.classes or bundled_names

    def counts(split: Any) -> str:
        per_class = np.bincount(dataset_labels(split), minlength=cfg.model.num_classes)
        named = [
            f"{n} {names[i] if names and i < len(names) else f'class {i}'}"
            for i, n in enumerate(per_class)
        ]
        return f"{int(per_class.sum())} images ({', '.join(named)})"

    source = cfg.data.loader or cfg.data.source
    return (
        f"envoy {cfg.node_id} of federation {cfg.federation}: {source} at "
        f"{cfg.data.path}, {share}\n  train {counts(data.train)}\n"
        f"  validation {counts(data.val)}\n  model {cfg.model.factory_name} on "
        f"{cfg.train.device}, bus {cfg.bus_url}; config, keys and data are usable, and the "
        "model builds and fits them"
    )


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

        state_dir = Path(load_director_config(args.config).state_dir)
    try:
        status, records = read_status(state_dir)
    except FileNotFoundError as exc:
        raise NoStatus(str(exc)) from None
    if args.json:
        import json

        print(json.dumps(status, indent=1))
    else:
        print(format_status(status, records))
    return 0


# -- dispatch -------------------------------------------------------------------------------


def _broker(argv: Sequence[str]) -> int:
    from broker.server.daemon import main as broker_main

    return broker_main(list(argv))


def _demo(argv: Sequence[str]) -> int:
    from node.demo.cli import main as demo_main

    return demo_main(list(argv))


def _provision(argv: Sequence[str]) -> int:
    from node.provision import main as provision_main

    return provision_main(argv)


def _attack(argv: Sequence[str]) -> int:
    from node.attack import main as attack_main

    return attack_main(argv)


def _export(argv: Sequence[str]) -> int:
    from node.export import main as export_main

    return export_main(list(argv))


def _ui(argv: Sequence[str]) -> int:
    from node.ui.server import main as ui_main

    return ui_main(list(argv))


RUNNERS: dict[str, Callable[[Sequence[str]], int]] = {
    "broker": _broker,
    "director": director_main,
    "envoy": envoy_main,
    "demo": _demo,
    "provision": _provision,
    "attack": _attack,
    "status": status_main,
    "export": _export,
    "ui": _ui,
}
COMMANDS = tuple(RUNNERS)


def _take_log_level(args: list[str]) -> tuple[str | None, list[str]]:
    """`--log-level LEVEL` / `--log-level=LEVEL` from anywhere before `--`; the rest."""
    level: str | None = None
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--":
            rest.append(arg)
            rest.extend(it)
            break
        if arg == "--log-level":
            level = next(it, None)
            if level is None:
                raise UsageError("--log-level needs a value")
        elif arg.startswith("--log-level="):
            level = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return level, rest


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        flag, args = _take_log_level(args)
        level = resolve_level(flag)
    except (UsageError, ValueError) as exc:
        print(f"fedbus: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    if args and args[0] == "--version":
        from node import __version__

        print(f"fedbus {__version__}")
        return int(ExitCode.OK)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return int(ExitCode.OK)
    command, rest = args[0], args[1:]
    if command not in RUNNERS:
        print(f"fedbus: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return int(ExitCode.USAGE)
    configure_logging(level)
    set_node(command)  # director and envoy rebind to their node id once it is known
    try:
        return int(RUNNERS[command](rest))
    except (Exception, KeyboardInterrupt) as exc:
        code = exit_code_for(exc)
        if code is None:
            raise
        if code != ExitCode.INTERRUPTED:
            print(f"fedbus {command}: {exc}", file=sys.stderr)
        return int(code)


if __name__ == "__main__":
    sys.exit(main())
