"""`fedbus demo`: the command line, the progress display and the exit status.

    fedbus demo [--envoys 5] [--rounds N] [--data PATH] [--transport zmq|mqtt]
                [--faults PLAN.toml] [--audit] [--out runs/NAME] [--set KEY=VALUE ...]

Ctrl-C / SIGTERM stops every process the demo started. Exit status (node.errors.ExitCode)
0 only when every round completed exactly once; 8 when --audit found a secure aggregate that
differs from the survivors' updates; 130 when interrupted; 2 for bad arguments; 3 for missing
or unusable data; the director's own code when it fails (5 a round failed every attempt, 6 quorum
lost, 7 its state folder); 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from node.demo.launcher import DIRECTOR, DemoError, Federation, Options, shipped_fault_plans
from node.demo.report import (
    REPORT,
    audit_rounds,
    build_report,
    final_evaluation,
    write_plots,
    write_report,
)
from node.errors import ExitCode, FedbusError
from node.progress import progress_display

POLL_S = 0.5
# After the director's Shutdown, envoys get this long to leave on their own.
ENVOY_EXIT_GRACE_S = 15.0


class Interrupted(FedbusError):
    """SIGINT or SIGTERM reached the launcher."""

    exit_code = ExitCode.INTERRUPTED


def parse_set_value(text: str) -> Any:
    """A --set value as TOML (numbers, booleans, arrays), else the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# -- progress -----------------------------------------------------------------------------------


class Progress:
    """The demo's display, fed by the director's status.json and rounds.jsonl (no bus needed):
    one line per completed round (also with --quiet), and on a terminal a bar with the
    current round, stage and envoys online."""

    def __init__(self, fed: Federation, quiet: bool) -> None:
        self.fed = fed
        self.display = progress_display(fed.opts.rounds, desc="fedbus", unit="round", quiet=quiet)
        self.seen = 0
        self.page_shown = False

    def update(self) -> None:
        records = self.fed.records()
        status: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            status = json.loads((self.fed.director_state / "status.json").read_text())
        url = status.get("ui_url")
        if url and not self.page_shown:  # --set ui.bind=...: the director serves the page
            self.page_shown = True
            self.display.message(f"fedbus demo: operator page {url}")
        if status:
            online = sum(1 for e in status.get("envoys", {}).values() if e.get("online"))
            self.display.set_status(
                f"round {status.get('round')} {status.get('stage')}, {online} online"
            )
        for rec in records[self.seen :]:
            self.display.message(_round_line(rec, self.fed.opts.rounds))
            self.display.update(1)
        self.seen = max(self.seen, len(records))

    def message(self, line: str) -> None:
        self.display.message(line)

    def close(self) -> None:
        self.display.close()


def _round_line(rec: dict[str, Any], total: int) -> str:
    val = (rec.get("metrics") or {}).get("val") or {}
    fates = rec.get("fates", {})

    def who(names: list[str]) -> str:
        return ", ".join(f"{n} at {fates[n]['stage']}" if n in fates else n for n in names)

    dropped = f" (dropped {who(rec['dropped'])})" if rec["dropped"] else ""
    if rec.get("left"):
        dropped += f" (left after its masked input: {who(rec['left'])})"
    width = len(str(total))
    return (
        f"round {rec['round']:{width}d}/{total}: {len(rec['survivors'])} envoys{dropped}, "
        f"{'secure' if rec['secure'] else 'PLAIN'}, val acc {val.get('accuracy', float('nan')):.3f} "
        f"auc {val.get('auc', float('nan')):.3f}, {rec['seconds']:.1f} s"
    )


# -- arguments ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedbus demo",
        description="A whole federation on this machine: broker, director and envoys as "
        "separate processes over loopback, with secure aggregation.",
    )
    p.add_argument("--envoys", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--data", help="pneumoniamnist.npz (or set FEDBUS_DATA)")
    p.add_argument("--transport", choices=("zmq", "mqtt"), default="zmq")
    p.add_argument(
        "--faults",
        help="fault plan: a TOML file, or the name of a shipped plan "
        f"({', '.join(shipped_fault_plans())})",
    )
    p.add_argument("--audit", action="store_true", help="check every secure aggregate bit for bit")
    p.add_argument("--out", help="output folder (default runs/demo-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partition", choices=("dirichlet", "iid"), default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha")
    p.add_argument("--limit", type=int, default=0, help="use at most this many samples per split")
    p.add_argument(
        "--insecure-plain-aggregation",
        action="store_true",
        help="send plain updates (the director sees each one); for comparisons only",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value: the director's (e.g. train.local_epochs=1, "
        "model.factory=pkg.mod:fn; the envoys take its [model]) or, for keys only envoys "
        "have, every envoy's (data.loader=pkg.mod:fn, train.device=cuda, train.trainer=...)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_has(kind: type, dotted: str) -> bool:
    """Whether `dotted` ("train.device") names a setting of the config Struct `kind`; any key
    below a free-form table (model.options.width) counts."""
    import msgspec

    info: Any = msgspec.inspect.type_info(kind)
    for part in dotted.split("."):
        if isinstance(info, msgspec.inspect.UnionType):
            info = next((t for t in info.types if isinstance(t, msgspec.inspect.StructType)), info)
        if isinstance(info, msgspec.inspect.DictType):
            return True
        if not isinstance(info, msgspec.inspect.StructType):
            return False
        field = next((f for f in info.fields if f.name == part), None)
        if field is None:
            return False
        info = field.type
    return True


def route_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--set KEY=VALUE pairs -> (director settings, envoy settings).

    A key of the director's config goes to the director (the envoys copy its [model]); a key
    only the envoy config has ([data] loader and options, [train] device, trainer, options,
    workers) goes to every envoy; anything else is an error naming the key.
    """
    from node.config import _PATH_FIELDS, DirectorConfig, EnvoyConfig

    director: dict[str, Any] = {}
    envoy: dict[str, Any] = {}
    for key, value in settings.items():
        if key.rsplit(".", 1)[-1] in _PATH_FIELDS and isinstance(value, str) and value:
            value = str(Path(value).resolve())  # a path on the command line: from here
        if config_has(DirectorConfig, key):
            director[key] = value
        elif config_has(EnvoyConfig, key):
            envoy[key] = value
        else:
            raise DemoError(f"--set {key}: neither the director's nor an envoy's config has it")
    return director, envoy


def options_from_args(args: argparse.Namespace) -> Options:
    if args.envoys < 2:
        raise DemoError("--envoys must be at least 2 (secure aggregation needs a crowd)")
    if args.rounds < 1:
        raise DemoError("--rounds must be at least 1")
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise DemoError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_set_value(value.strip())
    director_set, envoy_set = route_settings(overrides)
    return Options(
        envoys=args.envoys,
        rounds=args.rounds,
        data=args.data,
        transport=args.transport,
        faults=args.faults,
        audit=args.audit,
        out=args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}",
        seed=args.seed,
        alpha=args.alpha,
        partition=args.partition,
        limit=args.limit,
        insecure_plain=args.insecure_plain_aggregation,
        director_set=director_set,
        envoy_set=envoy_set,
        quiet=args.quiet,
    )


# -- running ------------------------------------------------------------------------------------


def _supervise(fed: Federation, progress: Progress) -> None:
    """Wait for the director, carrying out the fault plan and reporting envoys that exit."""
    director = fed.procs[DIRECTOR]
    warned: set[str] = set()
    while director.popen.poll() is None:
        time.sleep(POLL_S)
        fed.tick()
        progress.update()
        broker = fed.procs["broker"]
        if broker.popen.poll() is not None:
            raise DemoError(f"the broker died ({broker.popen.returncode}); see {broker.log}")
        for name in fed.names:
            p = fed.procs[name]
            if p.popen.poll() is not None and name not in warned:
                warned.add(name)
                line = _exit_line(fed, name, p.popen.returncode)
                if line:
                    progress.message(line)
    progress.update()
    code = director.popen.returncode
    if code != 0:
        status: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            status = json.loads((fed.director_state / "status.json").read_text())
        why = f" ({status['reason']})" if status.get("reason") else ""
        failed = DemoError(f"the director exited with {code}{why}; see {director.log}")
        # Its documented reason (quorum lost, state folder, round failed) is the demo's too.
        if code in {int(c) for c in ExitCode}:
            failed.exit_code = ExitCode(code)
        raise failed
    for name in fed.names:  # they got Shutdown; give them a moment to leave
        with contextlib.suppress(subprocess.TimeoutExpired):
            fed.procs[name].popen.wait(ENVOY_EXIT_GRACE_S)
    fed.stop_all()


def _exit_line(fed: Federation, name: str, returncode: int) -> str | None:
    """What to say about an envoy that exited while the director runs: nothing for exit 0
    (the director's Shutdown at the end of the federation), else whether the fault plan
    meant it."""
    if returncode == 0:
        return None
    how = "as the fault plan says" if fed.planned_crash(name) else "UNPLANNED"
    return f"fedbus demo: {name} exited ({returncode}), {how}; see {fed.procs[name].log}"


def _report(fed: Federation, seconds: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Audit, final evaluation, report.json and plots; (round records, report)."""
    records = fed.records()
    if fed.opts.audit:
        records = audit_rounds(fed, records)
    final = final_evaluation(fed)
    report = build_report(fed, records, final, seconds)
    report["plots"] = write_plots(fed.out, records, final)
    write_report(fed.out, report)
    t = final["test"]
    chosen = f"Best model: round {final['best_round']}"
    if final["threshold"] is not None:
        chosen += f" (threshold {final['threshold']:.2f} from validation)"
    if t is None:
        result = "no test split to score it on (the data loader returns none)"
    else:
        result = (
            f"TEST accuracy {t['accuracy']:.3f}, AUC {t['auc']:.3f}, sensitivity "
            f"{t['sensitivity']:.3f}, specificity {t['specificity']:.3f}, F1 {t['f1']:.3f}"
        )
    print(
        f"fedbus demo: done in {report['seconds']:.0f} s. {chosen}. {result}. "
        f"Report: {fed.out / REPORT}",
        file=sys.stderr,
    )
    return records, report


def _verdict(opts: Options, records: list[dict[str, Any]]) -> ExitCode:
    if [r["round"] for r in records] != list(range(1, opts.rounds + 1)):
        print("fedbus demo: FAILED: not every round completed exactly once", file=sys.stderr)
        return ExitCode.FAILURE
    if opts.audit:
        bad = [r["round"] for r in records if r.get("secure") and not r["aggregate_verified"]]
        if bad:
            print(f"fedbus demo: FAILED: audit mismatch in rounds {bad}", file=sys.stderr)
            return ExitCode.AUDIT_FAILED
        print("fedbus demo: audit: every secure aggregate verified bit for bit", file=sys.stderr)
    return ExitCode.OK


def run(opts: Options) -> int:
    fed = Federation(opts)
    fed.resolve_data()  # DataUnavailable (exit status 3) before anything starts

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    progress: Progress | None = None
    try:
        fed.prepare()
        fed.start_all()
        print(
            f"fedbus demo: {opts.envoys} envoys, {opts.rounds} round{'s' * (opts.rounds != 1)}, "
            f"bus {fed.broker_url}, "
            f"output {fed.out}",
            file=sys.stderr,
        )
        progress = Progress(fed, opts.quiet)
        _supervise(fed, progress)
        progress.close()
        records, _ = _report(fed, time.monotonic() - t0)
        return _verdict(opts, records)
    except Interrupted as exc:
        print(f"\nfedbus demo: {exc}: stopping every process", file=sys.stderr)
        return exc.exit_code
    except (DemoError, ValueError) as exc:
        print(f"fedbus demo: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, DemoError) else ExitCode.FAILURE
    finally:
        if progress is not None:
            progress.close()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fed.stop_all()
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts = options_from_args(args)
    except DemoError as exc:
        parser.error(str(exc))  # exits with status 2
    return run(opts)
