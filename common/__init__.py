"""What every ebb package shares and nothing else: the strict base of config sections and the
one-line form of errors, and the import of optional dependencies."""
