import pytest

from tests.helpers import server_process


@pytest.fixture(scope="session")
def server():
    """The default config.toml (MiniLM and SmolLM2 side by side) in a real `batchd serve` process.
    A generous deadline: this machine may be shared, and these tests are about correctness."""
    with server_process("models.all-MiniLM-L6-v2.device=cpu", "models.SmolLM2-135M-Instruct.device=cpu",
                        "server.request_timeout_s=120") as (proc, base):
        yield base
