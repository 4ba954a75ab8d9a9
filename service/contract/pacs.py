"""The PACS endpoints a hospital configures for the service, and the two ways to talk to one.

Endpoints are server-side only: a TOML file named by ``PRISM_PACS_FILE``, each entry a name with a
DICOMweb base URL (QIDO-RS, WADO-RS, STOW-RS, through dicomweb-client) and its auth (none, basic
with a password file, a bearer token file) and CA bundle, and/or a DICOM peer (AE title, host,
port) for C-STORE (through pynetdicom). A request names an endpoint; it never carries a URL or a
credential. Nothing here logs a UID, a patient attribute or a PACS answer's body.

    [endpoints.radiology.dicomweb]
    url = "https://orthanc.hospital.local/dicom-web"
    auth = "basic"
    username = "prism"
    password_file = "/run/secrets/pacs-password"

    [endpoints.radiology.dicom]
    ae_title = "ORTHANC"
    host = "orthanc.hospital.local"
    port = 4242

Torch-free.
"""

from __future__ import annotations

import io
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Literal

import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset

from models.request.errors import InvalidInput
from models.request.report import StoredCopy, StoredInstance

TIMEOUT_S = 30.0
FRONTAL_VIEWS = ("PA", "AP")
RADIOGRAPHS = ("CR", "DX")
STORED = (0x0000, 0xB000, 0xB006, 0xB007)
"""C-STORE statuses that mean stored: success, and the warnings (coercion, elements discarded)."""


class DicomWeb(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: Annotated[str, Field(pattern=r"^https?://\S+$")]
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    ca_bundle: Path | None = None

    @model_validator(mode="after")
    def _credentials(self) -> DicomWeb:
        if self.auth == "basic" and not (self.username and self.password_file):
            raise ValueError("basic auth needs username and password_file")
        if self.auth == "bearer" and not self.token_file:
            raise ValueError("bearer auth needs token_file")
        for name in ("password_file", "token_file", "ca_bundle"):
            if (path := getattr(self, name)) is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a readable file")
        return self


class DicomPeer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")]
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)]
    calling_ae: Annotated[str, Field(min_length=1, max_length=16)] = "PRISM"


class Endpoint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    dicomweb: DicomWeb | None = None
    dicom: DicomPeer | None = None

    @model_validator(mode="after")
    def _one_way_at_least(self) -> Endpoint:
        if self.dicomweb is None and self.dicom is None:
            raise ValueError("needs dicomweb, dicom, or both")
        return self


class PacsFileError(ValueError):
    """The endpoints file cannot be used; the message names the entry."""


@lru_cache(maxsize=4)
def load_endpoints(path: str) -> dict[str, Endpoint]:
    """The endpoints of ``path``, checked; a :class:`PacsFileError` naming the bad entry."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PacsFileError(f"cannot read {path}: {exc}") from None
    entries = raw.get("endpoints")
    if set(raw) != {"endpoints"} or not isinstance(entries, dict) or not entries:
        raise PacsFileError("must hold [endpoints.<name>] tables and nothing else")
    endpoints = {}
    for name, entry in entries.items():
        try:
            endpoints[name] = Endpoint.model_validate(entry)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise PacsFileError(f"endpoint {name!r}: {where}: {error['msg']}".replace(": : ", ": ")) from None
    return endpoints


class PacsError(Exception):
    """A PACS answer the caller can act on: ``status`` (an HTTP status), the request ``field`` at fault."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class PacsUnavailable(Exception):
    """The PACS could not be reached, or failed (a 5xx); its answer's body is not kept."""


def endpoint(pacs_file: str | None, name: str, field: str) -> Pacs:
    """The endpoint ``name`` of the service's file; an :class:`InvalidInput` naming ``field`` when
    there is no such endpoint."""
    endpoints = load_endpoints(pacs_file) if pacs_file else {}
    if name not in endpoints:
        known = ", ".join(sorted(endpoints)) or "none is configured (PRISM_PACS_FILE)"
        raise InvalidInput(field, f"no PACS endpoint {name!r}; this service knows: {known}")
    return Pacs(name, endpoints[name])


@dataclass(frozen=True)
class InstanceRef:
    study: str
    series: str
    instance: str


def _session(web: DicomWeb) -> requests.Session:
    session = requests.Session()
    if web.auth == "basic":
        session.auth = (web.username, web.password_file.read_text().strip())
    elif web.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {web.token_file.read_text().strip()}"
    if web.ca_bundle is not None:
        session.verify = str(web.ca_bundle)
    return session


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0]).strip().upper()


@dataclass
class Pacs:
    """One endpoint, by name."""

    name: str
    endpoint: Endpoint

    @cached_property
    def _web(self):
        """One DICOMweb client (and HTTP session) for all the calls on this endpoint object."""
        from dicomweb_client.api import DICOMwebClient

        if self.endpoint.dicomweb is None:
            raise PacsError(422, "source", f"endpoint {self.name!r} has no DICOMweb URL to read studies from")
        web = self.endpoint.dicomweb
        client = DICOMwebClient(web.url, session=_session(web))
        client.set_http_retry_params(retry=False)  # its 5 tries (30 s) would hold a submit; a worker retries stores
        return client

    def _call(self, what, *args, **kwargs):
        """A DICOMweb call; a refused request (4xx) or an unreachable or failing PACS, as our errors."""
        try:
            return what(*args, **kwargs)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code in (401, 403):
                raise PacsUnavailable(f"endpoint {self.name!r} refused the service's credentials ({code})") from None
            if code == 404:
                return None
            raise PacsUnavailable(f"endpoint {self.name!r} answered {code}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PacsUnavailable(f"endpoint {self.name!r} is unreachable ({type(exc).__name__})") from None
        except (requests.RequestException, ValueError) as exc:  # an answer that is not DICOMweb
            raise PacsUnavailable(f"endpoint {self.name!r} gave an unusable answer ({type(exc).__name__})") from None

    def frontal(self, study: str, series: str | None = None, instance: str | None = None) -> InstanceRef:
        """The instance to edit: ``instance`` if named, else the one frontal radiograph of the study
        (or series): CR or DX, ViewPosition PA or AP, one frame. None or several is a 422 saying
        what the study holds; a study (or instance) the PACS does not have is a 404."""
        client = self._web
        search = {"study_instance_uid": study, "fields": ["ViewPosition", "NumberOfFrames", "Modality"]}
        if series is not None:
            search["series_instance_uid"] = series
        found = self._call(client.search_for_instances, **search) or []
        if not found:
            field = "series_uid" if series else "study_uid"
            raise PacsError(404, field, f"endpoint {self.name!r} has no such {'series' if series else 'study'}")
        refs = [(InstanceRef(study, _value(item, "0020000E"), _value(item, "00080018")), item) for item in found]
        if instance is not None:
            named = [ref for ref, _ in refs if ref.instance == instance.upper()]
            if not named:
                raise PacsError(404, "sop_uid", f"endpoint {self.name!r} has no such instance in the study")
            return named[0]
        frontal = [
            ref
            for ref, item in refs
            if _value(item, "00080060") in RADIOGRAPHS
            and _value(item, "00185101") in FRONTAL_VIEWS
            and _value(item, "00280008") in ("", "1")
        ]
        if len(frontal) == 1:
            return frontal[0]
        seen = sorted({f"{_value(i, '00080060') or '?'} {_value(i, '00185101') or 'no view'}" for _, i in refs})
        if not frontal:
            message = f"no frontal radiograph (CR or DX, PA or AP, one frame); found: {', '.join(seen)}"
        else:
            message = f"{len(frontal)} frontal radiographs ({', '.join(seen)}): name series_uid or sop_uid"
        raise PacsError(422, "study_uid", message)

    def retrieve(self, ref: InstanceRef) -> bytes:
        """The instance as a DICOM Part 10 file (WADO-RS), to be checked as an upload is."""
        client = self._web
        dataset = self._call(client.retrieve_instance, ref.study, ref.series, ref.instance)
        if dataset is None:
            raise PacsError(404, "sop_uid", f"endpoint {self.name!r} no longer has the instance")
        buffer = io.BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        return buffer.getvalue()

    def store(self, files: Mapping[str, bytes]) -> StoredCopy:
        """Store DICOM files (by name) into their study: by STOW-RS where the endpoint has a
        DICOMweb URL, else by C-STORE to its DICOM peer. Their UIDs are the job's, so a second
        store replaces the first. A refusal or an unreachable PACS is :class:`PacsUnavailable`."""
        datasets = {name: dcmread(io.BytesIO(data)) for name, data in files.items()}
        if self.endpoint.dicomweb is not None:
            return self._stow(datasets)
        return self._c_store(datasets)

    def _stow(self, datasets: dict[str, Dataset]) -> StoredCopy:
        answer = self._call(self._web.store_instances, list(datasets.values()))
        if answer is None or answer.get("FailedSOPSequence"):
            raise PacsUnavailable(f"endpoint {self.name!r} refused to store the outputs")
        urls = {
            item.ReferencedSOPInstanceUID: item.get("RetrieveURL") for item in answer.get("ReferencedSOPSequence", [])
        }
        instances = [
            StoredInstance(
                file=name, sop_instance_uid=ds.SOPInstanceUID, status="stored", retrieve_url=urls.get(ds.SOPInstanceUID)
            )
            for name, ds in datasets.items()
        ]
        return StoredCopy(endpoint=self.name, protocol="STOW-RS", instances=instances)

    def _c_store(self, datasets: dict[str, Dataset]) -> StoredCopy:
        from pynetdicom import AE

        peer = self.endpoint.dicom
        ae = AE(ae_title=peer.calling_ae)
        for ds in datasets.values():
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        association = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
        if not association.is_established:
            raise PacsUnavailable(f"endpoint {self.name!r} refused or did not answer the DICOM association")
        instances = []
        try:
            for name, ds in datasets.items():
                code = getattr(association.send_c_store(ds), "Status", None)
                if code not in STORED:
                    status = "no answer" if code is None else f"status 0x{code:04X}"
                    raise PacsUnavailable(f"endpoint {self.name!r} did not store {name} ({status})")
                instances.append(StoredInstance(file=name, sop_instance_uid=ds.SOPInstanceUID, status=f"0x{code:04X}"))
        finally:
            association.release()
        return StoredCopy(endpoint=self.name, protocol="C-STORE", instances=instances)
