"""ichnode: a DICOM node that flags intracranial hemorrhage on head CT."""

__version__ = "0.1.0"
