"""pacs-node: a DICOM AI node that sits beside a hospital PACS."""

__version__ = "0.1.0"
