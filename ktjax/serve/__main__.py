"""python -m ktjax.serve: an OpenAI-compatible HTTP server (POST /v1/chat/completions, /v1/completions; GET
/v1/models, /health, /metrics) over a continuous-batching scheduler.

With no --model it serves the built-in demo model. Every runtime setting of `python -m ktjax.generate` is a flag
here too (its per-call settings, e.g. --max-new-tokens or --temperature, are the defaults of requests that do not
set them), and --config reads the same YAML presets. SIGTERM or Ctrl-C stops accepting requests, lets running
ones finish within --shutdown-timeout seconds and exits 0. Bad flags: one message, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..errors import KtjaxError
from ..generate import EXIT_BAD_INPUT, _Parser, add_setting_flags, resolve_settings

NEEDS = ("fastapi", "uvicorn", "prometheus_client")
INSTALL_HINT = "pip install 'ktjax[serve]' (or: pip install fastapi uvicorn prometheus_client)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ktjax.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face DeepSeek folder or a converted ktjax checkpoint "
                                   "(default: the built-in demo model)")
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for "
                                                       "every interface)")
    p.add_argument("--port", type=_int_flag(0, 65535), default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=_int_flag(1, 4096), default=8,
                   help="requests decoded together (default: 8)")
    p.add_argument("--page-size", type=_int_flag(1, 65536), default=64,
                   help="tokens per cache page (default: 64)")
    p.add_argument("--max-queue", type=_int_flag(0, 1 << 20), default=64,
                   help="requests waiting beyond the batch before new ones get 429 (default: 64)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route (default: none)")
    p.add_argument("--shutdown-timeout", type=_float_flag(), default=30.0,
                   help="seconds running requests get to finish after SIGTERM (default: 30)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="log level (default: info; one line per finished request at info)")
    p.add_argument("--config", help="a YAML preset of settings (configs/*.yaml); flags override it")
    add_setting_flags(p)
    return p


def _int_flag(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number from {lo} to {hi}")
        return value
    return parse


def _float_flag():
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds >= 0")
        return value
    return parse


def check_dependencies():
    import importlib.util

    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise KtjaxError(f"python -m ktjax.serve needs {', '.join(missing)}: {INSTALL_HINT}")


def check_address(host: str, port: int):
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise KtjaxError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    from ..demo import DEMO_MODEL_DIR
    return os.path.basename(os.path.normpath(args.model or DEMO_MODEL_DIR))


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        resolved = resolve_settings(args)
        check_dependencies()
        return serve(args, resolved)
    except KtjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def serve(args, resolved) -> int:
    import uvicorn

    from ..generate import enable_compilation_cache, load_engine
    from .app import create_app
    from .scheduler import Scheduler

    check_address(args.host, args.port)  # before minutes of loading and compiling
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    enable_compilation_cache()
    engine = load_engine(args, resolved)
    scheduler = Scheduler(engine, max_batch=args.max_batch, page_size=args.page_size, max_queue=args.max_queue)
    scheduler.warmup()
    scheduler.start()
    app = create_app(engine, scheduler, model_name=served_name(args), api_key=args.api_key)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    server.on_exit = lambda: setattr(app.state, "draining", True)
    # uvicorn handles SIGTERM/SIGINT while it runs, then re-raises the one it caught: ignore that, exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        scheduler.shutdown(timeout=args.shutdown_timeout)
    return 0


def _server_class():
    import uvicorn

    class Draining(uvicorn.Server):
        """uvicorn's server; on SIGTERM/SIGINT the app is told to refuse new requests (503) at once, while
        uvicorn stops listening and waits for the running ones."""
        on_exit = None

        def handle_exit(self, sig, frame):
            if self.on_exit is not None:
                self.on_exit()
            super().handle_exit(sig, frame)
    return Draining


def DrainingServer(config):  # noqa: N802 - a class, built lazily so that importing this module needs no uvicorn
    return _server_class()(config)


if __name__ == "__main__":
    sys.exit(main())
