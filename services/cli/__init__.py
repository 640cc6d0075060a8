"""The `tpi` command line: the one place where flags become settings."""
