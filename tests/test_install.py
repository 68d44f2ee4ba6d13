"""`make setup`: uv installs what pip would from the same pins and pip configuration, and the result is checked
against the pins (tools/install_requirements.py, tools/check_pins.py)."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tools.check_pins import VENV_SEEDS, pin_problems, read_pins
from tools.install_requirements import bootstrap_uv, install, recorded_digests, uv_arguments

REPO = Path(__file__).resolve().parents[1]
CLOUD_PYTHON = REPO / ".venv-cloud" / "bin" / "python"


def test_this_environment_holds_the_pinned_versions_each_file_as_its_record_gives_it() -> None:
    problems, _ = pin_problems(REPO / "requirements.txt")
    assert problems == []


def test_pin_problems_name_wrong_missing_loose_and_floating_pins(tmp_path: Path) -> None:
    requests = importlib.metadata.version("requests")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "# a comment\n"
        f"requests=={requests}  # its own dependencies left unpinned\n"
        "packaging==0.0.1\n"
        "no-such-package-anywhere==1.0\n"
        "pandas>=1\n"
    )
    problems, notes = pin_problems(requirements)
    assert f"{requirements}:5: 'pandas>=1' is not an exact pin; write pandas==<version>" in problems
    assert f"packaging {importlib.metadata.version('packaging')} is installed, but {requirements} pins ==0.0.1" in (
        problems
    )
    assert "no-such-package-anywhere is pinned (==1.0) but not installed" in problems
    assert f"requests needs urllib3, which {requirements} does not pin" in problems
    assert not any(p.startswith("requests ") and "installed" in p for p in problems)  # pinned at what is installed
    assert any(n.startswith("torch ") for n in notes)  # installed, yet neither pinned nor needed by a pin


@pytest.fixture
def pip_configuration(monkeypatch: pytest.MonkeyPatch):
    """pip's configuration from PIP_* variables alone: no configuration file of this machine is read."""
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)

    def configure(**settings: str) -> tuple[list[str], dict[str, str]] | None:
        for name, value in settings.items():
            monkeypatch.setenv(f"PIP_{name}", value)
        return uv_arguments()

    return configure


def test_without_pip_configuration_uv_resolves_and_compiles_like_pip(pip_configuration) -> None:
    assert pip_configuration() == (["--index-strategy", "unsafe-best-match", "--compile-bytecode"], {})


def test_every_pip_setting_that_changes_what_is_installed_becomes_its_uv_flag_or_variable(pip_configuration) -> None:
    arguments, environment = pip_configuration(
        INDEX_URL="https://mirror.example/simple",
        EXTRA_INDEX_URL="file:///opt/pypi/simple file:///opt/more/simple",
        FIND_LINKS="/opt/wheels /opt/more-wheels",
        CONSTRAINT="/etc/xdg/pip/constraints.txt",
        TRUSTED_HOST="mirror.example",
        ONLY_BINARY=":all:",
        NO_BINARY="torch",
        PRE="1",
        CERT="/etc/ssl/certs/ca-certificates.crt",
        DEFAULT_TIMEOUT="180",
        DISABLE_PIP_VERSION_CHECK="1",  # changes nothing installed: nothing to hand over
    )
    assert arguments == [
        *("--index-strategy", "unsafe-best-match", "--compile-bytecode", "--prerelease", "allow"),
        *("--no-binary", "torch", "--only-binary", ":all:"),
    ]
    assert environment == {  # lists joined by the separator uv splits each at (uv pip install --help)
        "UV_DEFAULT_INDEX": "https://mirror.example/simple",
        "UV_INDEX": "file:///opt/pypi/simple file:///opt/more/simple",
        "UV_FIND_LINKS": "/opt/wheels,/opt/more-wheels",
        "UV_CONSTRAINT": "/etc/xdg/pip/constraints.txt",
        "UV_INSECURE_HOST": "mirror.example",
        "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
        "UV_HTTP_TIMEOUT": "180",
    }


def test_settings_are_read_as_pip_reads_them(pip_configuration) -> None:
    # pip's quirk, which only pip's own parser gets right: a negative option's variable holds the positive value
    assert "--compile-bytecode" in pip_configuration(NO_COMPILE="yes")[0]
    assert "--compile-bytecode" not in pip_configuration(NO_COMPILE="no")[0]


def test_pip_setting_without_uv_equivalent_leaves_the_install_to_pip(
    pip_configuration, caplog: pytest.LogCaptureFixture
) -> None:
    assert pip_configuration(PREFER_BINARY="1") is None
    assert "uv cannot take the pip configuration's prefer_binary as pip does, so pip installs instead" in caplog.text


def test_a_list_item_that_uv_would_split_leaves_the_install_to_pip(
    pip_configuration, caplog: pytest.LogCaptureFixture
) -> None:
    """UV_FIND_LINKS is split at commas (the other list variables at spaces): /opt/a,b would reach uv as two."""
    assert pip_configuration(FIND_LINKS="/opt/wheels /opt/a,b") is None
    assert "uv cannot take the pip configuration's find_links as pip does, so pip installs instead" in caplog.text


def test_a_password_in_an_index_or_find_links_url_is_on_no_command_line_and_in_no_log_line(
    pip_configuration, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding: `make setup` logged the uv command with PIP_EXTRA_INDEX_URL's password in it, and the same URL sat on
    uv's command line, which any local user reads with `ps`. The URLs now reach uv in its environment (readable by
    its own user only, /proc/<pid>/environ) and the log shows them without user name and password."""
    prefix = tmp_path / "venv"
    uv = prefix / "uv-0.13.8" / "bin" / "uv"  # a uv that writes down what it was given
    uv.parent.mkdir(parents=True)
    uv.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\nenv > {tmp_path}/environ\n')
    uv.chmod(0o755)
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *args, **kwargs: str(tmp_path / "site-packages"))
    pip_configuration(
        INDEX_URL="https://tok3n@mirror.example/simple",
        EXTRA_INDEX_URL="http://bob:secret@host.example/simple https://alice:p%40ss@other.example/simple",
        FIND_LINKS="https://bob:secret@host.example/wheels/",
    )
    caplog.set_level(logging.INFO)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("six==1.17.0\n")

    assert install(["-r", str(requirements)], "0.13.8") == "uv 0.13.8"

    argv, environ = (tmp_path / "argv").read_text(), (tmp_path / "environ").read_text()
    for secret in ("secret", "tok3n", "p%40ss", "bob", "alice"):
        assert secret not in argv
        assert secret not in caplog.text
    assert "UV_INDEX=http://bob:secret@host.example/simple https://alice:p%40ss@other.example/simple" in environ
    assert "UV_FIND_LINKS=https://bob:secret@host.example/wheels/" in environ
    assert "UV_DEFAULT_INDEX=https://tok3n@mirror.example/simple" in environ
    assert "UV_INDEX='http://host.example/simple https://other.example/simple'" in caplog.text
    assert "UV_FIND_LINKS='https://host.example/wheels/'" in caplog.text


def _installed_distribution(site: Path, files: dict[str, bytes], name: str = "tiny-pkg") -> Path:
    """`name` 1.0 as an installer leaves it in `site`: its files, METADATA, and a RECORD with their sha256."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    files = {**files, f"{info.name}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode()}
    record = [f"{info.name}/RECORD,,"]
    for path, data in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info


def test_a_file_two_distributions_ship_is_theirs_as_the_one_installed_last_gave_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pycasbin and casbin both ship casbin/*.py: the copy installed last differs from the other's RECORD, no damage."""
    site = tmp_path / "site-packages"
    _installed_distribution(site, {"shared/data.bin": b"first"})
    _installed_distribution(site, {"shared/data.bin": b"second"}, name="other-pkg")  # installed last: its copy
    monkeypatch.syspath_prepend(str(site))
    recorded_digests.cache_clear()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tiny-pkg==1.0\nother-pkg==1.0\n")
    assert pin_problems(requirements)[0] == []


def test_pin_problems_name_a_package_whose_files_differ_from_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: after a SIGKILL mid-install, `make setup` certified a torch with files missing ("every package pinned
    and at its pinned version"). The check now compares every file with its RECORD: missing, cut short or changed."""
    site = tmp_path / "site-packages"
    info = _installed_distribution(site, {"tiny_pkg/__init__.py": b"", "tiny_pkg/data.bin": b"0123456789"})
    monkeypatch.syspath_prepend(str(site))
    recorded_digests.cache_clear()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tiny-pkg==1.0\n")
    assert pin_problems(requirements)[0] == []

    damage = "tiny-pkg 1.0 is damaged: tiny_pkg/data.bin {}; `make setup` installs it again"
    (site / "tiny_pkg" / "data.bin").unlink()  # what a killed install leaves
    assert damage.format("is missing") in pin_problems(requirements)[0]
    (site / "tiny_pkg" / "data.bin").write_bytes(b"01234")  # cut short
    assert damage.format("differs from its RECORD") in pin_problems(requirements)[0]
    (site / "tiny_pkg" / "data.bin").write_bytes(b"9876543210")  # the same size, other bytes
    assert damage.format("differs from its RECORD") in pin_problems(requirements)[0]
    (info / "RECORD").unlink()  # pip writes RECORD last
    assert (
        "tiny-pkg 1.0 is damaged: its RECORD is missing; `make setup` installs it again"
        in pin_problems(requirements)[0]
    )


def test_uv_that_cannot_be_had_leaves_the_install_to_pip(
    pip_configuration, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "wheels").mkdir()
    pip_configuration(NO_INDEX="1", FIND_LINKS=str(tmp_path / "wheels"))  # offline, no uv wheel at hand
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert bootstrap_uv("0.13.8") is None
    assert "uv 0.13.8 cannot be installed here, so pip installs instead" in caplog.text
    assert "No matching distribution found for uv==0.13.8" in caplog.text


def _versions(python: Path, requirements: Path, tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """What pip would install from `requirements` into a new environment, with this machine's pip configuration,
    and what `python`'s environment holds: {name: version}, local versions (2.13.0+cpu) included."""
    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(fresh)  # with its own pip, as `python -m venv` in make setup
    report = tmp_path / "report.json"
    dry_run = ["install", "--dry-run", "--quiet", "--report", str(report), "-r", str(requirements)]
    subprocess.run([fresh / "bin" / "python", "-m", "pip", *dry_run], check=True, capture_output=True)
    chosen = {
        canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    listed = [python, "-m", "pip", "list", "--format", "json"]
    installed = json.loads(subprocess.run(listed, check=True, capture_output=True, text=True).stdout)
    return chosen, {canonicalize_name(p["name"]): p["version"] for p in installed}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("python", "requirements"),
    [
        (Path(sys.executable), REPO / "requirements.txt"),
        pytest.param(
            CLOUD_PYTHON,
            REPO / "requirements-cloud.txt",
            marks=pytest.mark.skipif(not CLOUD_PYTHON.exists(), reason="the cloud engine is not installed"),
        ),
    ],
    ids=["requirements.txt", "requirements-cloud.txt"],
)
def test_installed_versions_are_what_pip_would_install(python: Path, requirements: Path, tmp_path: Path) -> None:
    """The same pins through pip's resolver (a dry run against the package indexes: needs PyPI) give, package for
    package, the versions installed, builds included: torch's CPU build where pip's configuration finds it."""
    chosen, installed = _versions(python, requirements, tmp_path)
    pins, _ = read_pins(requirements)
    assert set(pins) - VENV_SEEDS <= set(chosen)  # a new environment lacks every pin but what venv put there
    assert {name: installed.get(name) for name in chosen} == chosen


def test_the_installer_runs_in_a_new_environment_that_has_nothing_installed(tmp_path: Path) -> None:
    """make setup runs tools/install_requirements.py with the new venv's Python, before anything is installed: it may
    import the standard library and nothing else at its start (a merge once had it import tqdm)."""
    venv.create(tmp_path / "bare", with_pip=False)
    result = subprocess.run(
        [str(tmp_path / "bare" / "bin" / "python"), "-c", "import tools.install_requirements"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
