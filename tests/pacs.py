"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, as a plain process on free
loopback ports with a configuration of its own (HTTP basic auth, no remote access, DICOM only from
registered AE titles at their host), stopped by its pid. ``scripts/setup.sh`` installs it."""

from __future__ import annotations

import glob
import io
import json
import subprocess
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset

from cli.local_redis import free_port
from tests.stack import stop, wait_for

USER, PASSWORD = "prism", "orthanc-test-password"
PEER_AE = "PRISMTEST"
"""The AE title the tests' C-STORE calls from (registered with Orthanc)."""


class Orthanc:
    """``Orthanc --no-jobs CONFIG`` in ``directory``; ``url`` is its HTTP root, ``dicomweb`` its DICOMweb root."""

    def __init__(self, directory: Path, http_port: int | None = None, **settings: object) -> None:
        """``settings`` are more of Orthanc's configuration (``LuaScripts``, ``StableAge``)."""
        plugins = glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*")
        if not plugins:
            raise RuntimeError("the orthanc-dicomweb plugin is not installed (scripts/setup.sh installs it)")
        self.directory = directory
        self.http_port, self.dicom_port = http_port or free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "PRISM-TEST",
            "StorageDirectory": str(directory / "db"),
            "IndexDirectory": str(directory / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [plugins[0]],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"prism": [PEER_AE, "127.0.0.1", 104]},
            "DicomCheckModalityHost": True,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowMove": False,
            **settings,
        }
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(config))
        self.password_file = directory / "password"
        self.password_file.write_text(PASSWORD)
        self.log = directory / "orthanc.log"
        self.process = subprocess.Popen(
            ["Orthanc", "--no-jobs", str(directory / "config.json")],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self._up, bool, "Orthanc start", stall_s=60)

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {self.log.read_text(errors='replace')[-2000:]}")
        try:
            return self.get("/system").status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> httpx.Response:
        """Orthanc's own REST API."""
        return httpx.get(f"{self.url}{path}", auth=(USER, PASSWORD), timeout=10)

    def upload(self, data: bytes) -> str:
        """A DICOM file stored through Orthanc's REST API, as a modality's C-STORE would: its Orthanc study id."""
        answer = httpx.post(f"{self.url}/instances", content=data, auth=(USER, PASSWORD), timeout=30)
        answer.raise_for_status()
        return answer.json()["ParentStudy"]

    def endpoints_file(self, path: Path, **extra: dict) -> Path:
        """A PRISM_PACS_FILE with ``radiology`` (this Orthanc by DICOMweb), ``peer`` (by C-STORE only)
        and ``extra`` endpoints (TOML inline tables)."""
        lines = [
            "[endpoints.radiology]",
            f'dicomweb = {{ url = "{self.dicomweb}", auth = "basic", username = "{USER}", '
            f'password_file = "{self.password_file}" }}',
            "[endpoints.peer]",
            f'dicom = {{ ae_title = "ORTHANC", host = "127.0.0.1", port = {self.dicom_port}, '
            f'calling_ae = "{PEER_AE}" }}',
        ]
        for name, table in extra.items():
            body = ", ".join(f"{key} = {json.dumps(value)}" for key, value in table.items())
            lines += [f"[endpoints.{name}]", f"dicomweb = {{ {body} }}"]
        path.write_text("\n".join(lines) + "\n")
        return path

    def store(self, *datasets: Dataset) -> None:
        """STOW-RS the datasets (Part 10, with their preamble)."""
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.dicomweb, session=_session())
        client.store_instances([dcmread(io.BytesIO(_part10(ds))) for ds in datasets])

    def instances(self, study: str) -> list[Dataset]:
        """Every instance of ``study`` Orthanc holds, read back in full (WADO-RS)."""
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.dicomweb, session=_session())
        return client.retrieve_study(study) if client.search_for_instances(study_instance_uid=study) else []

    def close(self) -> None:
        stop(self.process)


def _session():
    import requests

    session = requests.Session()
    session.auth = (USER, PASSWORD)
    return session


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
