"""Endpoint parsing helpers and the ssh command line georep builds (real ``ssh -G``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from transport.endpoint import (
    AES_FIRST_CIPHERS,
    OPENSSH_DEFAULT_CIPHERS,
    choose_ciphers,
    cpu_has_aes,
    parse_secondary,
    ssh_base_argv,
)

X86 = "processor\t: 0\nflags\t\t: fpu vme sse2 aes avx pclmulqdq\n"
X86_NO_AES = "processor\t: 0\nflags\t\t: fpu vme sse2 avx\n"
ARM64 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"


def test_cpu_has_aes_reads_the_flags_line() -> None:
    assert cpu_has_aes(X86)
    assert cpu_has_aes(ARM64)
    assert not cpu_has_aes(X86_NO_AES)
    assert not cpu_has_aes("flags\t: fpu vme aesni-like\n")  # a whole word only
    assert not cpu_has_aes("")


def test_aes_first_only_replaces_openssh_untouched_default() -> None:
    assert choose_ciphers(OPENSSH_DEFAULT_CIPHERS, True) == (f"-oCiphers={AES_FIRST_CIPHERS}",)
    assert choose_ciphers(OPENSSH_DEFAULT_CIPHERS, False) == ()
    assert choose_ciphers("aes256-ctr", True) == ()  # someone chose: theirs stays
    assert choose_ciphers(None, True) == ()  # ssh -G said nothing usable


def test_aes_first_offers_the_same_ciphers() -> None:
    assert sorted(AES_FIRST_CIPHERS.split(",")) == sorted(OPENSSH_DEFAULT_CIPHERS.split(","))
    assert AES_FIRST_CIPHERS.split(",")[0] == "aes128-gcm@openssh.com"


needs_ssh_aes = pytest.mark.skipif(shutil.which("ssh") is None or not cpu_has_aes(),
                                   reason="needs the OpenSSH client and a CPU with AES")
EP = parse_secondary("backup@replica.invalid:/srv/replica")


def _ciphers(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("-oCiphers=")]


@needs_ssh_aes
def test_real_ssh_default_gets_aes_first() -> None:
    # ssh's effective ciphers are OpenSSH's default here (no config file): georep reorders.
    assert _ciphers(ssh_base_argv(EP, ssh_command="ssh -F /dev/null")) == [
        f"-oCiphers={AES_FIRST_CIPHERS}"]


@needs_ssh_aes
def test_a_cipher_chosen_by_the_user_is_left_alone(tmp_path: Path) -> None:
    assert _ciphers(ssh_base_argv(
        EP, ssh_command="ssh -F /dev/null -c chacha20-poly1305@openssh.com")) == []
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n    Ciphers aes256-ctr\n")
    assert _ciphers(ssh_base_argv(EP, ssh_command=f"ssh -F {config}")) == []
    # A client that is not ssh itself might connect when given -G: not asked at all.
    assert _ciphers(ssh_base_argv(EP, ssh_command=f"{shutil.which('true')} ssh")) == []
