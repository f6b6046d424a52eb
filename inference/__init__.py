"""Datasets in, volumes, models, label volumes, SEG/SR/SC datasets out.

Imports neither ``pacs_node`` nor ``storage``.
"""
