"""The embedded demo (a known-reward toy task, `apo-train demo`) and the exact log-linear check of APO."""
