"""The server's /dashboard: its JSON (/dashboard/data) against the scheduler's own counts and a request's usage,
the API key (the page open, its data not), and the page itself rendered by headless Chromium with every plot
drawn (its series' colours found inside each plot's canvas in a screenshot)."""
from __future__ import annotations

import html.parser
import os
import subprocess
import time

import httpx
import numpy as np
import pytest

from serve_harness import MODEL, ServerThread

CHROMIUM = "/usr/bin/chromium"
PROMPT = "The key to reading a long document is"
# Each plot's first series and its colour in dashboard.html: drawn only from data, never in a legend on the canvas.
PLOT_COLOURS = {"plot-memory": (0x1f, 0x77, 0xb4), "plot-pages": (0x2c, 0xa0, 0x2c),
                "plot-requests": (0xff, 0x7f, 0x0e), "plot-speed": (0x17, 0xbe, 0xcf)}


@pytest.fixture(scope="module")
def stack(serve_stack):
    return serve_stack


def data(url: str, **headers) -> dict:
    r = httpx.get(url + "/dashboard/data", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def complete(url: str, max_tokens: int) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT + " today", "max_tokens":
                                                  max_tokens, "temperature": 0, "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def test_data_counts_one_request(stack):
    """After one request the counters moved by exactly its work, the levels are the scheduler's, and the rates
    of the history integrate back to the counters (sum of rate x interval = tokens)."""
    engine, scheduler, server = stack
    time.sleep(0.6)  # each read below a sample apart from the one before (at most one every 0.5 s)
    before = data(server.url)["now"]
    time.sleep(0.6)
    usage = complete(server.url, 5)
    time.sleep(0.6)
    body = data(server.url)
    now, history = body["now"], body["history"]
    assert body["model"] == MODEL
    assert now["prefill_tokens"] - before["prefill_tokens"] == \
        usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert now["decode_tokens"] - before["decode_tokens"] == 5 - 1  # the first token comes from the prefill
    stats = scheduler.stats()
    assert now["pages_total"] == stats["pages_total"] > 0
    assert (now["running"], now["waiting"], now["pages_used"]) == (0, 0, stats["pages_used"])
    assert now["peak_memory_bytes"] >= now["memory_bytes"] > 50 << 20  # at least the weights and JAX
    assert history[-1] == now and len(history) >= 3
    ts = [s["t"] for s in history]
    assert ts == sorted(ts) and all(b - a >= 0.5 for a, b in zip(ts, ts[1:]))
    for key in ("prefill", "decode"):
        integral = sum(s[f"{key}_tokens_per_s"] * (s["t"] - p["t"]) for p, s in zip(history, history[1:]))
        assert integral == pytest.approx(now[f"{key}_tokens"] - history[0][f"{key}_tokens"], rel=1e-9)
        assert max(s[f"{key}_tokens_per_s"] for s in history) > 0


def test_page_open_data_needs_key(stack):
    engine, scheduler, _ = stack
    from ktjax.serve.app import create_app

    server = ServerThread(create_app(engine, scheduler, model_name=MODEL, api_key="sekret"))
    try:
        page = httpx.get(server.url + "/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert "<canvas" in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN
        assert httpx.get(server.url + "/dashboard/data").status_code == 401
        assert data(server.url, Authorization="Bearer sekret")["model"] == MODEL
    finally:
        server.stop()


class Canvases(html.parser.HTMLParser):
    """Each canvas's id -> its data-rect (left, top, width, height on the page) and data-points, as the page's
    script left them."""

    def __init__(self):
        super().__init__()
        self.found = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "canvas" and "data-rect" in a:
            self.found[a["id"]] = (tuple(int(v) for v in a["data-rect"].split(",")), int(a["data-points"]))


def chromium(url: str, *flags: str) -> subprocess.CompletedProcess:
    # --virtual-time-budget: the page's script runs (and its fetch completes) before the DOM or pixels are read
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--force-device-scale-factor=1", "--window-size=1100,700", "--virtual-time-budget=3000",
                           "--user-data-dir=" + flags[-1] + ".profile", *flags[:-1], url],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no {CHROMIUM} (apt-get install chromium; .ci/run "
                                                          "installs it)")
def test_chromium_draws_every_plot(stack, tmp_path):
    from PIL import Image

    url = stack[2].url
    complete(url, 3)  # some tokens to plot
    time.sleep(0.6)
    dom = chromium(url + "/dashboard", "--dump-dom", str(tmp_path / "dom"))
    parser = Canvases()
    parser.feed(dom.stdout)
    assert set(parser.found) == set(PLOT_COLOURS), (dom.stdout[-2000:], dom.stderr[-2000:])
    shot = tmp_path / "dashboard.png"
    run = chromium(url + "/dashboard", f"--screenshot={shot}", str(tmp_path / "shot"))
    assert shot.exists(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    for name, colour in PLOT_COLOURS.items():
        (left, top, width, height), points = parser.found[name]
        assert points >= 2 * 2, name  # two series, at least two samples each
        plot = pixels[top:top + height, left:left + width]
        assert plot.shape[:2] == (height, width), name
        drawn = (np.abs(plot - colour).sum(axis=-1) <= 24).sum()  # the series' colour, antialiasing allowed
        assert drawn >= 30, f"{name}: {drawn} pixels of its series' colour"
        background = (plot == 255).all(axis=-1).mean()
        assert 0.5 < background < 0.995, f"{name}: {background:.3f} of the canvas is blank"
    # the page around the plots is not where the colours came from: outside the canvases they appear only in
    # the legends' small squares
    outside = pixels.copy()
    for (left, top, width, height), _ in parser.found.values():
        outside[top:top + height, left:left + width] = 0
    assert (np.abs(outside - PLOT_COLOURS["plot-memory"]).sum(axis=-1) <= 24).sum() < 200
