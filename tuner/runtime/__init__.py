"""The runtime a serving engine imports: spec, launch config, dispatch lookup, loader, validation and
the decode/prefill API. It needs torch and triton only and imports nothing from the other layers."""

__version__ = "0.1.0"
