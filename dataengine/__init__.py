"""dataengine: the core library (no Prefect imports here).

Stages are plain functions over Arrow tables; flows/ decides where and when they run.
"""

__version__ = "0.1.0"
