"""radnode.dicom_io."""
