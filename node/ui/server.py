"""Serving the operator page: the `[ui]` config section, the bind policy, uvicorn.

    [ui]
    bind = "127.0.0.1:8080"          # loopback: no TLS or credentials needed
    # Beyond loopback all four are required, or the director refuses to start the page:
    # tls_cert = "ui/cert.pem"
    # tls_key = "ui/key.pem"
    # username = "operator"
    # password_file = "ui/password"
    # allowed_hosts = ["director.example.org"]   # Host names the page answers to

The policy: the page shows who takes part and how the rounds go, so it is served in the
clear and without a password on loopback only (an operator reaches it through an SSH
tunnel, say). Any other address, the wildcard ones included, needs TLS and credentials,
and a half-configured pair (a certificate without a key, a user without a password) is an
error rather than a silently weaker page.

`OperatorPage` runs uvicorn inside the host process's event loop, as a task beside the
director. It never installs signal handlers: SIGINT/SIGTERM stay the director's, which
stops the page with `stop()` on its way out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import uvicorn

from node.errors import ExitCode
from node.ui.app import LOOPBACK_HOSTS, create_app
from node.ui.config import UiConfig, UiConfigError, check_bind_policy, is_loopback, parse_bind
from node.ui.feed import OperatorFeed

__all__ = [
    "OperatorPage",
    "UiConfig",
    "UiConfigError",
    "check_bind_policy",
    "is_loopback",
    "parse_bind",
]


def _read_password(path: str) -> str:
    try:
        password = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UiConfigError(f"ui.password_file {path}: {exc.strerror or exc}") from None
    if len(password) < 12:
        raise UiConfigError(f"ui.password_file {path}: the password must have >= 12 characters")
    return password


class OperatorPage:
    """The page, served by uvicorn in the current event loop until `stop()`."""

    def __init__(self, feed: OperatorFeed, cfg: UiConfig) -> None:
        host, port = check_bind_policy(cfg)
        credentials = (
            (cfg.username, _read_password(cfg.password_file))
            if cfg.username and cfg.password_file
            else None
        )
        for name in ("tls_cert", "tls_key"):
            value = getattr(cfg, name)
            if value and not Path(value).is_file():
                raise UiConfigError(f"ui.{name} {value}: no such file")
        self.app = create_app(
            feed,
            poll_s=cfg.poll_s,
            credentials=credentials,
            allowed_hosts=[h for h in [host, *cfg.allowed_hosts] if h not in LOOPBACK_HOSTS],
        )
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            ssl_certfile=cfg.tls_cert,
            ssl_keyfile=cfg.tls_key,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _EmbeddedServer(config)
        self.scheme = "https" if cfg.tls_cert else "http"

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    @property
    def port(self) -> int:
        """The bound port (the real one when the config asked for port 0)."""
        for server in self._server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("the operator page is not listening yet")

    async def serve(self) -> None:
        """Serve until `stop()`; UiConfigError if the address cannot be bound."""
        where = f"{self._server.config.host}:{self._server.config.port}"
        try:
            await self._server.serve()
        except SystemExit:  # uvicorn's answer to a failed bind; the director must live on
            raise UiConfigError(
                f"ui.bind {where}: cannot listen there (in use, or not this host's address)"
            ) from None
        if not self._server.started:
            raise UiConfigError(f"ui.bind {where}: the page did not start")

    def stop(self) -> None:
        self.app.state.closing = True
        self._server.should_exit = True


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The host process (the director) owns SIGINT/SIGTERM and stops the page itself.
        yield


def main(argv: list[str]) -> int:
    """`fedbus ui STATE_DIR`: the page for a director running elsewhere on this host."""
    import argparse
    import asyncio
    import signal
    import sys

    from node.ui.feed import StateDirFeed

    p = argparse.ArgumentParser(
        prog="fedbus ui",
        description="Serve the read-only operator page from a director's state folder.",
    )
    p.add_argument("state_dir", type=Path, help="the director's state_dir")
    p.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--username")
    p.add_argument("--password-file")
    p.add_argument("--allowed-host", action="append", default=[], dest="allowed_hosts")
    args = p.parse_args(argv)
    try:
        cfg = msgspec.convert(
            {k: v for k, v in vars(args).items() if k != "state_dir" and v is not None},
            UiConfig,
        )
        page = OperatorPage(StateDirFeed(args.state_dir), cfg)
    except msgspec.ValidationError as exc:
        print(f"fedbus ui: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except UiConfigError as exc:
        print(f"fedbus ui: {exc}", file=sys.stderr)
        return int(exc.exit_code)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, page.stop)
        task = asyncio.create_task(page.serve())
        while not page.started and not task.done():
            await asyncio.sleep(0.05)
        if page.started:
            print(f"operator page: {page.scheme}://{cfg.bind.rsplit(':', 1)[0]}:{page.port}/")
        try:
            await task
        except UiConfigError as exc:
            print(f"fedbus ui: {exc}", file=sys.stderr)
            return int(exc.exit_code)
        return 0

    return asyncio.run(run())
