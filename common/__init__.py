"""What every ebb package shares and nothing else: the strict base of config sections, the
one-line form of errors, the import of optional dependencies (and the silencing of their import
noise, set up here once per process), a DTensor's local shard and which process of a run reports."""

from common.imports import quiet_import_noise

quiet_import_noise()
