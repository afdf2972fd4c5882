"""The `dataengine` command: the top of the house, the one layer that may import everything
(dataengine/, models/, flows/, connectors/, dashboards/)."""
