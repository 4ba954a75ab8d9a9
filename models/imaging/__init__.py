"""Images in and out: decoding (PNG, JPEG, DICOM), the pad-and-resize mapping to the model's
square and back, the signed difference map and DICOM Secondary Captures. ``dicom`` and
``difference`` are torch-free (the API reads uploads with them)."""
