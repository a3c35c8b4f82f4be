import shutil

import numpy as np
import pytest

from hf_models import build_hf_model, load_oracle, save_hf_model


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """hf_folder(name) -> a saved tiny model folder (built once per session) and its reloaded oracle."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = str(tmp_path_factory.mktemp(name))
            save_hf_model(build_hf_model(name), folder, name)
            cache[name] = (folder, load_oracle(folder))
        return cache[name]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def v2_lite_copy(hf_folder, tmp_path):
    """A private copy of the v2_lite test model's folder, for tests that break it."""
    src, _ = hf_folder("v2_lite")
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="session")
def serve_stack():
    """(engine, scheduler, server thread): the demo model served over HTTP, shared by the tests/test_serve*.py
    modules so that they compile its programs once."""
    from serve_harness import start_stack

    stack = start_stack()
    yield stack
    stack[2].stop()
    stack[1].shutdown(timeout=10)


@pytest.fixture(scope="session")
def cpu_kernels_built():
    """Skip where ktjax's C++ CPU kernels cannot be built (no compiler): used as a fixture, so that collecting the
    tests never builds them."""
    from ktjax.cpu import build

    why = build.available()
    if why is not None:
        pytest.skip(why)
