"""Variant quality: the gates a variant is held to, and the probes that let the server hold it to
them again on the machine that serves it."""
