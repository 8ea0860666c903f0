"""Shared fixtures. Keep each one small and self-contained."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random LLaVA-NeXT saved with save_pretrained (built once per session)."""
    from glue_vlm.testing.tiny_llava import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="session")
def transformers_server(tiny_llava_dir, tmp_path_factory):
    """``transformers serve`` on the tiny LLaVA-NeXT (offline, CPU): its base URL."""
    from glue_vlm.testing.openai_server import serve_transformers

    log = tmp_path_factory.mktemp("transformers-serve") / "serve.log"
    with serve_transformers(tiny_llava_dir, log_path=log) as url:
        yield url
