"""`fedbus demo`: the command line, the progress display and the exit status.

    fedbus demo [--envoys 5] [--rounds N] [--data PATH] [--transport zmq|mqtt]
                [--faults PLAN.toml] [--audit] [--out runs/NAME] [--set KEY=VALUE ...]

Ctrl-C / SIGTERM stops every process the demo started. Exit status 0 only when every round
completed exactly once (and, with --audit, every secure aggregate verified); 130 when
interrupted, 2 for bad arguments or missing data, 1 otherwise.
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
from typing import Any

from node.demo.launcher import DIRECTOR, DemoError, Federation, Options
from node.demo.report import (
    REPORT,
    audit_rounds,
    build_report,
    final_evaluation,
    write_plots,
    write_report,
)
from node.errors import ExitCode, FedbusError

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
    """A progress bar fed by the director's status.json and rounds.jsonl (no bus needed)."""

    def __init__(self, fed: Federation, quiet: bool) -> None:
        self.fed = fed
        self.bar: Any = None
        self.seen = 0
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=fed.opts.rounds, unit="round", desc="fedbus", dynamic_ncols=True)

    def update(self) -> None:
        records = self.fed.records()
        status: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            status = json.loads((self.fed.director_state / "status.json").read_text())
        for rec in records[self.seen :]:
            if self.bar is not None:
                self.bar.write(_round_line(rec))
                self.bar.update(1)
        self.seen = max(self.seen, len(records))
        if self.bar is not None and status:
            online = sum(1 for e in status.get("envoys", {}).values() if e.get("online"))
            self.bar.set_postfix_str(
                f"round {status.get('round')} {status.get('stage')}, {online} online", refresh=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _round_line(rec: dict[str, Any]) -> str:
    val = (rec.get("metrics") or {}).get("val") or {}
    fates = rec.get("fates", {})

    def who(names: list[str]) -> str:
        return ", ".join(f"{n} at {fates[n]['stage']}" if n in fates else n for n in names)

    dropped = f" (dropped {who(rec['dropped'])})" if rec["dropped"] else ""
    if rec.get("left"):
        dropped += f" (left after its masked input: {who(rec['left'])})"
    return (
        f"round {rec['round']:3d}: {len(rec['survivors'])} envoys{dropped}, "
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
    p.add_argument("--faults", help="fault plan TOML (configs/faults/*.toml)")
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
        help="override a director config value, e.g. --set train.local_epochs=1",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise DemoError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_set_value(value.strip())
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
        director_set=overrides,
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
                how = "as the fault plan says" if fed.planned_crash(name) else "UNPLANNED"
                print(f"fedbus demo: {name} exited ({p.popen.returncode}), {how}", file=sys.stderr)
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
    print(
        f"fedbus demo: done in {report['seconds']:.0f} s. Best model: round {final['best_round']} "
        f"(threshold {final['threshold']:.2f} from validation). TEST accuracy {t['accuracy']:.3f}, "
        f"AUC {t['auc']:.3f}, sensitivity {t['sensitivity']:.3f}, specificity "
        f"{t['specificity']:.3f}, F1 {t['f1']:.3f}. Report: {fed.out / REPORT}",
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
            return ExitCode.FAILURE
        print("fedbus demo: audit: every secure aggregate verified bit for bit", file=sys.stderr)
    return ExitCode.OK


def run(opts: Options) -> int:
    from node.training.data import DataUnavailable

    fed = Federation(opts)
    try:
        fed.resolve_data()
    except DataUnavailable as exc:
        print(f"fedbus demo: {exc}", file=sys.stderr)
        return ExitCode.USAGE

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    progress: Progress | None = None
    try:
        fed.prepare()
        fed.start_all()
        print(
            f"fedbus demo: {opts.envoys} envoys, {opts.rounds} rounds, bus {fed.broker_url}, "
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
    args = build_parser().parse_args(argv)
    try:
        opts = options_from_args(args)
    except DemoError as exc:
        print(f"fedbus demo: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    return run(opts)
