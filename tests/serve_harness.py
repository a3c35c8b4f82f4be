"""Helpers for the server tests: a uvicorn server in a thread on a free port, the demo engine and a scheduler."""
from __future__ import annotations

import socket
import threading
import time

import serve_fakes

serve_fakes.install()  # before ktjax.serve.app is imported: the real scheduler when it exists, else the stand-in


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """app served by uvicorn on 127.0.0.1 in a daemon thread; .url is its base URL."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def scheduler_class():
    from ktjax.serve import scheduler
    return getattr(scheduler, "Scheduler", None) or serve_fakes.FakeScheduler


def demo_engine(**settings):
    import ktjax
    from ktjax.demo import DEMO_MODEL_DIR
    return ktjax.load(DEMO_MODEL_DIR, **settings)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


MODEL = "demo_model"


def start_stack(**app_options):
    from ktjax.serve.app import create_app

    engine = demo_engine()
    # No warmup(): compiling every bucket takes minutes on a small CPU; the tests compile the shapes they use.
    scheduler = scheduler_class()(engine, max_batch=4, page_size=16, max_queue=64)
    scheduler.start()
    server = ServerThread(create_app(engine, scheduler, model_name=MODEL, **app_options))
    return engine, scheduler, server
