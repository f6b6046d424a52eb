"""Result objects built from a job's label volume: DICOM SEG, TID 1500 SR,
a burned-in key image (Secondary Capture + PNG), and the "not processed" notice.

Datasets in, datasets out; nothing here talks to the network or the database.
"""
