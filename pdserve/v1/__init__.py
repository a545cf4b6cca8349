"""pdserve wire version v1: generated from ``proto/pdserve/v1/*.proto`` (do not edit the ``*_pb2*`` files)."""
