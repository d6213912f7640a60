"""The model lifecycle: loading a version, the registry of what is served, and reloading."""
