"""The command's logging setup: pydicom's warnings, which quote attribute values, never reach the log."""

import subprocess
import sys

SCRIPT = """
import logging
from cli import configure_logging
from models.imaging.dicom import read_dicom
from models.request.errors import ImageError
from tests.dicom_files import malformed_value
configure_logging(logging.DEBUG, json_lines=False)
try:
    read_dicom(malformed_value(), 10**7)
except ImageError as exc:
    logging.getLogger("prism").warning("refused: %s", exc.message)
"""


def test_pydicom_warnings_quoting_values_are_silenced():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "refused: the DICOM file has an attribute with an invalid value" in proc.stderr
    assert "1A" not in proc.stderr and "pydicom" not in proc.stderr
