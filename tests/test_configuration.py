"""Every setting a service reads from its environment is documented, with its default, in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.common.config import ConfigError, env_float
from services.common.https import https_context
from services.ingest.config import DownloadSettings

ROOT = Path(__file__).resolve().parents[1]
# The environment helpers of services/common/config.py (and ingest's choice among fixed values), called with a name.
READ = re.compile(r'\b(?:env_str|env_int|env_float|env_bool|env_list|_choice)\(\s*"([A-Z][A-Z0-9_]+)"')
PREFIXED = re.compile(r'GrpcServerSettings\.from_env\(\s*"([A-Z_]+)"')


def variables_the_services_read() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        text = path.read_text()
        names |= set(READ.findall(text))
        for prefix in PREFIXED.findall(text):
            names |= {f"{prefix}_LISTEN", f"{prefix}_METRICS_LISTEN"}
    return names


def configuration_table() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Configuration\n")
    return readme[start:readme.index("\n## ", start + 1)]


def test_every_variable_a_service_reads_is_in_the_readme_configuration_table() -> None:
    names = variables_the_services_read()
    assert {"DELIVERY_POLL_SECONDS", "TRANSCRIBE_LISTEN", "WHISPER_NO_SPEECH_THRESHOLD"} <= names  # the scan sees them
    table = configuration_table()
    undocumented = sorted(n for n in names if f"`{n}`" not in table)
    assert not undocumented, f"read by the services but not in the README's Configuration table: {undocumented}"


def test_a_setting_below_its_minimum_is_refused_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELIVERY_POLL_SECONDS", "0.001")
    with pytest.raises(ConfigError, match="DELIVERY_POLL_SECONDS=0.001 is below the minimum 0.05"):
        env_float("DELIVERY_POLL_SECONDS", 2.0, minimum=0.05)


@pytest.mark.parametrize(("variables", "refusal"), [
    ({"RECORDING_AUTHORIZATION": "Bearer abc"}, "without RECORDING_AUTHORIZATION_HOSTS"),
    ({"RECORDING_AUTHORIZATION_HOSTS": "recorder.example"}, "without RECORDING_AUTHORIZATION"),
])
def test_a_recording_credential_must_name_its_hosts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    variables: dict[str, str], refusal: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=refusal):
        DownloadSettings.from_env(tmp_path)


def test_the_recording_credential_goes_only_to_its_hosts_and_stays_out_of_the_settings_repr(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECORDING_AUTHORIZATION", "Bearer s3cr3t")
    monkeypatch.setenv("RECORDING_AUTHORIZATION_HOSTS", "Recorder.Example, api.recorder.example")
    settings = DownloadSettings.from_env(tmp_path)
    assert settings.authorization_for("recorder.example") == "Bearer s3cr3t"
    assert settings.authorization_for("RECORDER.example") == "Bearer s3cr3t"
    assert settings.authorization_for("other.example") == ""
    assert "s3cr3t" not in repr(settings)


def test_an_outbound_ca_bundle_that_cannot_be_read_is_refused_with_its_name(tmp_path: Path) -> None:
    (tmp_path / "not-a-ca.pem").write_text("hello")
    for path in (tmp_path / "missing.pem", tmp_path / "not-a-ca.pem"):
        with pytest.raises(ConfigError, match="OUTBOUND_TLS_CA=.*not a readable PEM CA bundle"):
            https_context(str(path))


def test_a_share_for_file_urls_must_be_an_absolute_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECORDING_FILE_ROOTS", "/mnt/recordings/, recordings")
    with pytest.raises(ConfigError, match="RECORDING_FILE_ROOTS: 'recordings' is not an absolute directory"):
        DownloadSettings.from_env(tmp_path)
    monkeypatch.setenv("RECORDING_FILE_ROOTS", "/mnt/recordings/,/srv//calls")
    assert DownloadSettings.from_env(tmp_path).file_roots == ("/mnt/recordings", "/srv/calls")
