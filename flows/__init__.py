"""Prefect flows: thin, they read like the process and call dataengine/ for the work."""
