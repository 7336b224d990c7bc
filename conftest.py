"""Makes the repository root importable for the tests in bench/ (pytest puts this folder on sys.path)."""
