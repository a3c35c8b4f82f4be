"""Helpers for the server tests: a uvicorn server in a thread on a free port, the demo engine and its scheduler."""
from __future__ import annotations

import socket
import threading
import time


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
    from ktjax.serve.scheduler import Scheduler

    engine = demo_engine()
    # No warmup(): compiling every bucket takes minutes on a small CPU; the tests compile the shapes they use.
    scheduler = Scheduler(engine, max_batch=4, page_size=16, max_queue=64)
    scheduler.start()
    server = ServerThread(create_app(engine, scheduler, model_name=MODEL, **app_options))
    return engine, scheduler, server


class RefusingScheduler:
    """A scheduler whose submit always raises `error`: the HTTP status of each of the scheduler's refusals."""

    def __init__(self, error: Exception):
        self.error = error

    def submit(self, prompt_ids, params, on_event):
        raise self.error

    def cancel(self, handle):
        pass

    def stats(self):
        return {"page_size": 16, "running": 0, "waiting": 0}
