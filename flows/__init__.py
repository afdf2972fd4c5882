"""Prefect flows: thin, they read like the process and call dataengine/ for the work.

A Prefect worker imports them with nothing else of ours around them, so they set the
offline/loopback defaults themselves (dataengine/runtime.py; a variable already set wins).
"""

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()
