"""Fixtures shared by the whole test tree."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.sshd import SshServer, sshd_missing, start_sshd


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A real sshd on 127.0.0.1 that accepts :attr:`SshServer.client_key` as root."""
    why = sshd_missing()
    if why:
        pytest.skip(why)
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server
