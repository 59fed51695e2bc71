"""The round machinery every method shares: the Flower strategy base (``base``), the node
directory, downloads, reply decoding, the bounding guard, streaming aggregation, secure
aggregation, the round's ledger and the protocol's vocabulary. The methods themselves are in
:mod:`fedlora.methods`."""
