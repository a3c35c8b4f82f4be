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
