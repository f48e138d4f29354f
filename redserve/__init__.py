"""The ``redserve`` command: runs gateways, workers, or the whole stack on one machine."""
