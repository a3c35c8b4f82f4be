"""python -m ktjax.serve: an OpenAI-compatible HTTP server (POST /v1/chat/completions, /v1/completions; GET
/v1/models, /health, /metrics) over a continuous-batching scheduler.

With no --model it serves the built-in demo model. Every runtime setting of `python -m ktjax.generate` is a flag
here too (its per-call settings, e.g. --max-new-tokens or --temperature, are the defaults of requests that do not
set them), and --config reads the same YAML presets. SIGTERM or Ctrl-C stops accepting requests, lets running
ones finish within --shutdown-timeout seconds and exits 0 (before the server listens, while the model loads
and compiles, it stops at once: exit 130). Bad flags: one message, exit 2. A client that takes more than
--header-timeout seconds to send a request's headers, or more than --body-timeout seconds for its body, is
disconnected (slowloris), and so is a keep-alive connection idle for --idle-timeout seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys

from ktjax.errors import KtjaxError
from ktjax.cli.common import Parser, add_setting_flags, add_version_flag, check_text_flags, resolve_settings
from ktjax.util.process import EXIT_BAD_INPUT, EXIT_INTERRUPTED, interrupted_by, interrupted_line, signals_interrupt
from ktjax.util.text import short_repr
from ktjax.util.units import format_seconds

NEEDS = ("fastapi", "uvicorn", "prometheus_client")
INSTALL_HINT = "pip install 'ktjax[serve]' (or: pip install fastapi uvicorn prometheus_client)"
EXAMPLES = """examples:
  python -m ktjax.serve --port 8000
  python -m ktjax.serve --model MODEL --max-batch 16 --cache-dtype int8 --api-key SECRET
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "Hello", "max_tokens": 16}'
"""
log = logging.getLogger("ktjax.serve")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ktjax.serve", usage="%(prog)s [--model MODEL] [--port N] [options]",
               description=__doc__, epilog=EXAMPLES)
    p.add_argument("--model", help="a Hugging Face DeepSeek folder, a converted ktjax checkpoint, or a Hugging "
                                   "Face Hub id (org/name or org/name@revision; downloaded into the Hugging Face "
                                   "cache unless there) (default: the built-in demo model)")
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: the folder's name, "
                                               "or the Hub id)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for "
                                                       "every interface)")
    p.add_argument("--port", type=_int_flag(0, 65535), default=8000, help="port (default: 8000)")
    add_version_flag(p)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health (default: "
                                    "none)")
    server = p.add_argument_group("server")
    server.add_argument("--max-batch", type=_int_flag(1, 4096), default=8,
                        help="requests decoded together (default: 8)")
    server.add_argument("--page-size", type=_int_flag(1, 65536), default=64,
                        help="tokens per cache page (default: 64)")
    server.add_argument("--warmup", choices=("all", "none"), default="all",
                        help="all: compile every step program (prefill chunks and decode batches, by cache table "
                             "width) before listening, so traffic never waits for a compile; none: listen at once "
                             "and compile each program on its first use, which waits for it (at DeepSeek-V2-Lite's "
                             "size on a CPU, up to about a minute a program that JAX's cache does not hold) "
                             "(default: all)")
    server.add_argument("--max-queue", type=_int_flag(0, 1 << 20), default=64,
                        help="requests waiting beyond the batch before new ones get 429 (default: 64)")
    server.add_argument("--shutdown-timeout", type=_float_flag(), default=30.0,
                        help="seconds running requests get to finish after SIGTERM (default: 30)")
    server.add_argument("--header-timeout", type=_float_flag(), default=10.0,
                        help="seconds a client gets to send a request's headers, from connecting or from the end of "
                             "its previous response; a slower one is disconnected (default: 10)")
    server.add_argument("--body-timeout", type=_float_flag(), default=60.0,
                        help="seconds a client gets to send a request's body; a slower one gets 408 (default: 60)")
    server.add_argument("--idle-timeout", type=_float_flag(), default=5.0,
                        help="seconds a keep-alive connection may stay idle between requests (default: 5)")
    server.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                        help="log level (default: info; one line per finished request at info)")
    add_setting_flags(p, config_help="a YAML preset of settings (configs/*.yaml); flags override it; per-call "
                                     "settings become the requests' defaults")
    return p


def _int_flag(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{short_repr(text)}: must be a whole number from {lo} to {hi}")
        return value
    return parse


def _float_flag():
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{short_repr(text)}: must be a number of seconds >= 0")
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
    from ktjax.demo import DEMO_MODEL_DIR
    from ktjax.weights.hub import hub_model_id
    folder = args.model or DEMO_MODEL_DIR
    return hub_model_id(folder) or os.path.basename(os.path.normpath(folder))


def main(argv=None) -> int:
    with signals_interrupt():
        try:
            args = build_parser().parse_args(argv)
            check_text_flags(args)
            resolved = resolve_settings(args)
            check_dependencies()
            return serve(args, resolved)
        except KtjaxError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except BaseException as e:  # while loading or compiling, before the server took over the signals
            if not interrupted_by(e) or isinstance(e, SystemExit):
                raise
            print(interrupted_line(e, "the server never started"), file=sys.stderr)
            return EXIT_INTERRUPTED


def serve(args, resolved) -> int:
    with server_logging(args.log_level):
        return _serve(args, resolved)


def _serve(args, resolved) -> int:
    import time

    from ktjax.cli.common import ENGINE_MODULES
    from ktjax.util.process import import_uninterrupted

    started = time.perf_counter()
    log.info("starting: loading %s, then compiling its programs (a cold start takes a minute or more) ...",
             args.model or "the demo model")
    import_uninterrupted(*ENGINE_MODULES, "uvicorn", "fastapi", "ktjax.serve.app", "ktjax.serve.scheduler")
    import uvicorn

    from ktjax.cli.common import enable_compilation_cache, load_engine
    from ktjax.serve.app import create_app
    from ktjax.serve.scheduler import Scheduler

    check_address(args.host, args.port)  # before minutes of loading and compiling
    enable_compilation_cache()
    engine = load_engine(args, resolved)
    scheduler = Scheduler(engine, max_batch=args.max_batch, page_size=args.page_size, max_queue=args.max_queue)
    try:
        programs = len(scheduler.programs.shapes())
        if args.warmup == "all":
            log.info("loaded in %.1f s; compiling %d programs (prefill chunks and decode batches; JAX's compilation "
                     "cache makes the next start faster; --warmup none listens at once) ...",
                     time.perf_counter() - started, programs)
            # minutes: Ctrl-C or SIGTERM here raises, and main() reports it
            scheduler.warmup(compile_progress(time.perf_counter()))
        else:
            log.info("loaded in %.1f s; --warmup none: each of up to %d programs compiles on its first use",
                     time.perf_counter() - started, programs)
        scheduler.start()
        app = create_app(engine, scheduler, model_name=served_name(args), api_key=args.api_key,
                         body_timeout=args.body_timeout)
        server = DrainingServer(server_config(app, args))
        server.on_exit = lambda: setattr(app.state, "draining", True)
        server.on_ready = lambda: log.info("ready in %.1f s: http://%s:%d", time.perf_counter() - started,
                                           args.host, server.config.port)
        # From here a signal drains: uvicorn takes SIGTERM/SIGINT while it runs, then re-raises each it caught
        # (into these handlers, which tell the finished server again: nothing happens). One that arrives before
        # uvicorn takes over makes it stop as soon as it has started.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, server.handle_exit)
        server.run()
    finally:
        scheduler.shutdown(timeout=args.shutdown_timeout)
    return 0


def compile_progress(start: float, every_s: float = 10.0):
    """warmup's progress(done, total) as a log line at most every `every_s` seconds, and at the end."""
    import time

    last = [start]

    def progress(done: int, total: int):
        now = time.perf_counter()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            left = "" if done == total else f" (about {format_seconds((now - start) / done * (total - done))} left)"
            log.info("compiled %d of %d programs in %.1f s%s", done, total, now - start, left)
    return progress


@contextlib.contextmanager
def server_logging(level: str):
    """ktjax's lines at --log-level (uvicorn sets its own); other libraries' only from WARNING unless at debug:
    JAX's INFO line "Unable to initialize backend 'tpu'" would read as the cause of a slow start. The levels
    come back afterwards (main() runs in-process in tests)."""
    root, ours = logging.getLogger(), logging.getLogger("ktjax")
    before = root.level, ours.level
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    number = getattr(logging, level.upper())
    root.setLevel(number if number == logging.DEBUG else max(number, logging.WARNING))
    ours.setLevel(number)
    try:
        yield
    finally:
        root.setLevel(before[0])
        ours.setLevel(before[1])


def server_config(app, args):
    """uvicorn's settings: address, logging, the drain's timeout, and the slow-client timeouts."""
    import uvicorn

    return uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                          timeout_graceful_shutdown=args.shutdown_timeout, timeout_keep_alive=args.idle_timeout,
                          http=_header_timeout_protocol(args.header_timeout))


def _header_timeout_protocol(seconds: float):
    """uvicorn's HTTP protocol, which waits for a request's headers for ever (it times out only the idle time
    after a response, and a first byte stops that clock), with a deadline: `seconds` from connecting, and again
    from the end of each response, the next request's headers must be in, or the connection is closed."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderDeadline(AutoHTTPProtocol):
        _deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _expire(self):
            serving = self.cycle is not None and not self.cycle.response_complete
            if not serving and not self.transport.is_closing():  # headers still not in
                self.transport.close()
    return HeaderDeadline


def _server_class():
    import uvicorn

    class Draining(uvicorn.Server):
        """uvicorn's server; on SIGTERM/SIGINT the app is told to refuse new requests (503) at once, while
        uvicorn stops listening and waits for the running ones. on_ready runs once it listens."""
        on_exit = on_ready = None

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit and self.on_ready is not None:
                self.on_ready()

        def handle_exit(self, sig, frame):
            if self.on_exit is not None:
                self.on_exit()
            super().handle_exit(sig, frame)
    return Draining


def DrainingServer(config):  # noqa: N802 - a class, built lazily so that importing this module needs no uvicorn
    return _server_class()(config)


if __name__ == "__main__":
    sys.exit(main())
