"""The server's settings and how they are read (TOML, environment, flags)."""
