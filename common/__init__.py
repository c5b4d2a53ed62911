"""What every ebb package shares and nothing else: the strict base of config sections, the
one-line form of errors, the import of optional dependencies, a DTensor's local shard and which
process of a run reports."""
