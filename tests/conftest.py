import os
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import async_online_dpo as A  # noqa: E402

# Small but real: the built-in model with a short warm start, shared by every test in the session.
SFT_STEPS = 30


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    A.warm_start(A.Args(cache_dir=str(path), sft_steps=SFT_STEPS))
    return str(path)


@pytest.fixture(scope="session")
def model_path(cache_dir):
    return A.warm_start(A.Args(cache_dir=cache_dir, sft_steps=SFT_STEPS))


def wrapper_script(tmp_path, prelude: str) -> str:
    """A script that runs async_online_dpo.py's main after `prelude`. The generator is spawned, so it imports this
    file again as __mp_main__: a patch in the prelude reaches the generator too."""
    wrapper = tmp_path / f"wrapper_{uuid.uuid4().hex[:8]}.py"
    wrapper.write_text(
        f"import sys\nsys.path.insert(0, {ROOT!r})\nimport torch\nimport tyro\nimport async_online_dpo as A\n"
        f"{prelude}\n"
        "if __name__ == '__main__':\n    A.main(tyro.cli(A.Args))\n"
    )
    return str(wrapper)
