"""Sources and sinks: where samples come from and go to, outside the core library.

- `report`: ConnectorReport, the found / written / skipped-with-reason account each
  connector returns, and the RGB flattening they share.
- `tuxpaint`: Tux Paint's captioned stamps (Debian tuxpaint-stamps-default) -> shards.
- `skimage_samples`: the photographs bundled in scikit-image (and scikit-learn,
  matplotlib when installed) -> shards, without touching the network.

Importing this package loads nothing heavy; each connector imports its own optional
libraries.
"""
